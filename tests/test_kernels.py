"""Every Triton kernel against its torch reference (kernels/reference.py) over odd sizes: partial
last blocks, block tables with holes, GQA ratios 1, 4 and 8, head sizes 64 and 128, chunked
prefill with prior context, one sequence and many. Without CUDA they run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1), so shapes stay small."""

import math
import random

import pytest
import torch

from counterpoint.kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def scattered_cache(lengths: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype, seed: int = 0):
    """A random cache with each sequence's blocks spread over a larger pool (holes between them)."""
    rng = random.Random(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = 2 * sum(need) + 3
    ids = rng.sample(range(num_blocks), sum(need))
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    start = 0
    for s, k in enumerate(need):
        tables[s, :k] = torch.tensor(ids[start : start + k])
        start += k
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    return cache.to(DEVICE), tables.to(DEVICE)


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_store_kv_matches_reference():
    from counterpoint.kernels.kv_store import store_kv

    for dtype in DTYPES:
        cache = torch.zeros(2, 2, 6, 8, 64, dtype=dtype, device=DEVICE)
        expected = cache.clone()
        key, value = (torch.randn(5, 2, 64).to(dtype).to(DEVICE) for _ in range(2))
        slots = torch.tensor([3, 17, -1, 40, 9], device=DEVICE)  # -1: a padding row
        store_kv(key, value, cache, slots)
        ref.store_kv(key, value, expected, slots)
        assert torch.equal(cache, expected)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,lengths", [
    (4, 4, 64, 16, [1, 17, 40]),  # GQA 1, partial last blocks
    (8, 2, 64, 8, [33]),  # GQA 4, one sequence
    (8, 1, 128, 16, [5, 70, 16, 129]),  # GQA 8, head size 128, many sequences
    (4, 2, 64, 16, [700, 90]),  # long enough for the long-split tiles with one or few splits
])
def test_paged_decode_matches_reference(num_heads, num_kv_heads, head_dim, block_size, lengths):
    from counterpoint.kernels.paged_decode import paged_decode

    for dtype in DTYPES:
        cache, tables = scattered_cache(lengths, num_kv_heads, head_dim, block_size, dtype)
        q = torch.randn(len(lengths), num_heads, head_dim).to(dtype).to(DEVICE)
        lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        scale = head_dim**-0.5
        expected = ref.paged_decode(q, cache, tables, lens, scale)
        # Several splits force the split-K merge; 16 leaves the short sequences with empty splits.
        for splits in (None, 1, 3, 16):
            assert_close(paged_decode(q, cache, tables, lens, scale, num_splits=splits), expected, dtype)
        # A host bound on the context, as the engine passes, picks the tile size (long splits: 64 keys).
        assert_close(paged_decode(q, cache, tables, lens, scale, max(lengths), num_splits=1), expected, dtype)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,chunks", [
    (4, 4, 64, 16, [(0, 20)]),  # plain prefill: (cached tokens before, new tokens)
    (8, 2, 64, 8, [(13, 7), (0, 5), (32, 1)]),  # chunked prefill after prior context, GQA 4
    (8, 1, 128, 16, [(17, 19), (40, 3)]),  # GQA 8, head size 128
])
def test_paged_prefill_matches_reference(num_heads, num_kv_heads, head_dim, block_size, chunks):
    from counterpoint.kernels.paged_prefill import paged_prefill

    for dtype in DTYPES:
        lengths = [before + new for before, new in chunks]
        cache, tables = scattered_cache(lengths, num_kv_heads, head_dim, block_size, dtype)
        qlens = [new for _, new in chunks]
        starts = [sum(qlens[:i]) for i in range(len(qlens))]
        q = torch.randn(sum(qlens), num_heads, head_dim).to(dtype).to(DEVICE)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
        args = (q, cache, tables, as_t(starts), as_t(qlens), as_t(lengths), head_dim**-0.5)
        assert_close(paged_prefill(*args), ref.paged_prefill(*args), dtype)


@pytest.mark.parametrize("hidden", [64, 100])
def test_fused_add_rms_norm_matches_reference(hidden):
    from counterpoint.kernels.rms_norm import fused_add_rms_norm

    for dtype in DTYPES:
        x, residual = (torch.randn(7, hidden).to(dtype).to(DEVICE) for _ in range(2))
        weight = (torch.rand(hidden) + 0.5).to(dtype).to(DEVICE)
        want_out, want_sum = ref.fused_add_rms_norm(x, residual.clone(), weight, 1e-6)
        got_out, got_sum = fused_add_rms_norm(x, residual, weight, 1e-6)
        assert_close(got_out, want_out, dtype)
        assert_close(got_sum, want_sum, dtype)
        assert got_sum.data_ptr() == residual.data_ptr(), "the sum must be written into the residual in place"
        alone, _ = fused_add_rms_norm(x, None, weight, 1e-6)
        assert_close(alone, ref.fused_add_rms_norm(x, None, weight, 1e-6)[0], dtype)


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place_matches_reference(rope, head_dim):
    from counterpoint.kernels.rotary import rotary_
    from counterpoint.serving.models.rope import cos_sin_cache, inverse_frequencies

    cos_sin = cos_sin_cache(inverse_frequencies(rope, head_dim), 300).to(DEVICE)
    positions = torch.tensor([0, 5, 299, 64, 130], device=DEVICE)
    for dtype in DTYPES:
        x = torch.randn(5, 3, head_dim).to(dtype).to(DEVICE)
        expected = ref.rotary(x, positions, cos_sin)
        got = rotary_(x, positions, cos_sin)
        assert got.data_ptr() == x.data_ptr()
        assert_close(got, expected, dtype)


def test_reference_attention_agrees_with_sdpa():
    """The references themselves against torch's SDPA on a contiguous layout."""
    cache, tables = scattered_cache([21], 2, 64, 8, torch.float32)
    keys, values = ref._context(cache, tables[0], 21)
    q = torch.randn(21, 4, 64, device=DEVICE)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.repeat_interleave(2, 0), values.repeat_interleave(2, 0), is_causal=True)
    args = (q, cache, tables, torch.tensor([0]), torch.tensor([21]), torch.tensor([21]), 1 / math.sqrt(64))
    torch.testing.assert_close(ref.paged_prefill(*args), sdpa.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_wrappers_reject_bad_arguments():
    from counterpoint.kernels.paged_decode import paged_decode

    cache, tables = scattered_cache([4], 2, 64, 8, torch.float32)
    lens = torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="query heads \\(3\\) must be a multiple of KV heads \\(2\\)"):
        paged_decode(torch.randn(1, 3, 64, device=DEVICE), cache, tables, lens, 0.125)
    with pytest.raises(ValueError, match="q must be contiguous in its last dimension"):
        paged_decode(torch.randn(1, 64, 4, device=DEVICE).transpose(1, 2), cache, tables, lens, 0.125)
    with pytest.raises(ValueError, match="block_tables must be one of"):
        paged_decode(torch.randn(1, 4, 64, device=DEVICE), cache, tables.float(), lens, 0.125)


def test_engine_on_the_triton_backend_matches_transformers(llama_dir):
    """The whole GPU path (KV store, paged decode and chunked prefill, fused RMSNorm, rotary)
    inside the engine; interpreted on the CPU, native on a GPU."""
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM
    from test_greedy_vs_transformers import hf_greedy

    prompts = [[5, 17, 33, 100, 7, 9, 11], list(range(40, 61))]
    llm = LLM(str(llama_dir), attention_backend="triton", device=DEVICE, dtype="float32", block_size=8,
              max_num_batched_tokens=8, max_num_seqs=2, show_progress=False)  # 8-token chunks: chunked prefill
    assert type(llm.engine.main.runner.backend).__name__ == "TritonAttention"
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(llama_dir, p, 6) for p in prompts]


def test_decode_graph_buffers_pad_batches_without_touching_the_cache(llama_dir):
    """The decode-graph path (static buffers, batches padded to a bucket, padding rows with slot −1)
    equals transformers while the batch shrinks 5 -> 4 -> 3 -> 2 -> 1: five sequences exceed the
    largest bucket and run eagerly, three are padded to four, and steps with a context over the
    graphs' 24 tokens run eagerly too. Without CUDA the buffers are replayed eagerly; the capture
    itself is checked by the GPU test below."""
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM
    from test_greedy_vs_transformers import hf_greedy

    prompts = [[5, 17, 33, 100, 7, 9, 11], list(range(40, 61)), [3, 4], [8] * 12, [60, 50, 40]]
    lengths = [9, 7, 5, 3, 2]
    llm = LLM(str(llama_dir), attention_backend="triton", device=DEVICE, dtype="float32", block_size=8,
              max_num_seqs=8, show_progress=False)
    slot = llm.engine.main
    buckets, max_context = [1, 2, 4], 24
    slot.runner.capture_decode_graphs(buckets, max_context, show_progress=False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    # The step that makes token t feeds token t - 1 at position len(prompt) + t - 2.
    alive = [[i for i, n in enumerate(lengths) if n >= t] for t in range(2, max(lengths) + 1)]
    fit = [len(a) <= buckets[-1] and max(len(prompts[i]) + t - 1 for i in a) <= max_context
           for t, a in enumerate(alive, start=2)]
    assert 0 < sum(fit) < len(fit)
    assert slot.runner.graphs.replays == sum(fit)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(llama_dir, p, n) for p, n in zip(prompts, lengths)]


def test_decode_graphs_carry_the_no_context_stream(llama_dir):
    """ACD's second stream (the prompt without its documents) runs in the same decode graphs as
    the main one: steps replay, and the tokens equal those of the torch path without graphs."""
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM

    prompts, documents = ["the cat sat", "a b c d"], [["one two three four"], ["five six"]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, context_contrast={"method": "acd"})
    graphed = LLM(str(llama_dir), attention_backend="triton", device=DEVICE, dtype="float32", block_size=8,
                  max_num_seqs=4, show_progress=False)
    graphed.engine.main.runner.capture_decode_graphs([2, 4], 48, show_progress=False)
    eager = LLM(str(llama_dir), attention_backend="torch", dtype="float32", block_size=8, show_progress=False)
    outs = [llm.generate(prompts, params, documents=documents, use_tqdm=False) for llm in (graphed, eager)]
    assert graphed.engine.main.runner.graphs.replays > 0
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


def test_decode_graph_batch_buckets():
    from counterpoint.serving.attention.cuda_graphs import default_batch_sizes

    assert default_batch_sizes(256, 256) == [1, 2, 4] + list(range(8, 257, 8))
    assert default_batch_sizes(20, 256) == [1, 2, 4, 8, 16, 20]
    assert default_batch_sizes(512, 64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_batch_sizes(1, 256) == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_cuda_graphs_match_eager(llama_dir, dtype):
    """Greedy with decode steps replayed from CUDA graphs equals the eager Triton path, with
    batches that shrink across buckets. A padded batch may pick other GEMM tiles, so half
    precision may flip one near-tie."""
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM

    prompts = [[5, 17, 33, 100, 7, 9, 11], list(range(40, 300)), [9] * 70, [3, 4]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (40, 31, 17, 9)]
    outs = {}
    for eager in (False, True):
        llm = LLM(str(llama_dir), device="cuda", dtype=dtype, max_num_seqs=8, enforce_eager=eager,
                  show_progress=False)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        graphs = llm.engine.main.runner.graphs
        assert (graphs is None) == eager and (eager or graphs.replays > 30)
    same = [a == b for a, b in zip(outs[False], outs[True])]
    assert sum(same) >= len(same) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_triton_path_matches_torch_path(llama_dir, dtype):
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving import LLM

    prompts = [[5, 17, 33, 100, 7, 9, 11], list(range(40, 300)), [9] * 70]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {backend: LLM(str(llama_dir), attention_backend=backend, device="cuda", dtype=dtype,
                         show_progress=False).generate(prompts, params, use_tqdm=False)
            for backend in ("torch", "triton")}
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs["torch"], outs["triton"])]
    assert sum(same) >= len(same) - 1, "half precision may flip one near-tie, not more"


def test_bench_kernels_runs_end_to_end_at_toy_size():
    """A smoke run of the GPU benchmark's code path (its figures only mean something on a GPU)."""
    from argparse import Namespace

    from counterpoint.serving.bench.kernels import kernels

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    args = Namespace(device=DEVICE, allow_cpu=True, dtype="float32", peak_gbs=100.0, attention_shapes=[(2, 40)],
                     heads=4, kv_heads=2, head_dim=64, batch_sizes=[1, 2], input_len=8, steps=2, iters=1, shape=tiny,
                     prefill_lens=[20])
    result = kernels(args)
    assert result["prefill"][0]["triton_ms"] > 0 and result["prefill"][0]["torch_ms"] > 0
    assert [r["batch"] for r in result["decode"]] == [1, 2]
    assert all(r["counterpoint_ms"] > 0 and r["transformers_ms"] >= 0 for r in result["decode"])
    assert result["attention"][0]["triton_kv_gb_s"] > 0 and result["attention"][0]["torch_us"] > 0


@pytest.mark.parametrize("m,k,n,bits,group_size", [
    (1, 64, 40, 4, 32),  # decode, a partial N tile
    (3, 96, 64, 4, 96),  # one group per row
    (17, 64, 48, 8, 32),  # a second M tile, 8 bits
    (2, 128, 32, 8, 64),
])
def test_quant_matmul_matches_reference(m, k, n, bits, group_size):
    from counterpoint.kernels.quant_matmul import quant_matmul

    gen = torch.Generator().manual_seed(m * k + n)
    qweight = torch.randint(-2**31, 2**31, (k * bits // 32, n), generator=gen, dtype=torch.int64).to(torch.int32)
    scale = (torch.rand(k // group_size, n, generator=gen) * 0.02).to(DEVICE)
    offset = (torch.randn(k // group_size, n, generator=gen) * 0.1).to(DEVICE)
    qweight = qweight.to(DEVICE)
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
        expected = ref.quant_matmul(x, qweight, scale, offset, bits, group_size)
        for splits in (None, 1, k // 32):  # one split per 32 inputs: the most there can be
            got = quant_matmul(x, qweight, scale, offset, bits, group_size, num_splits=splits)
            torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype] * 10,
                                       rtol=TOLERANCE[dtype])


def test_quant_matmul_rejects_mismatched_layouts():
    from counterpoint.kernels.quant_matmul import quant_matmul

    x = torch.randn(2, 64, device=DEVICE)
    qweight = torch.zeros(8, 16, dtype=torch.int32, device=DEVICE)
    scale = torch.zeros(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quant_matmul(x, qweight, scale, scale, 3, 32)
    with pytest.raises(ValueError, match="match qweight"):
        quant_matmul(x, qweight, scale, scale, 8, 32)
    with pytest.raises(ValueError, match=r"scale and offset must be \(1, 16\)"):
        quant_matmul(x, qweight, scale, scale, 4, 64)
