"""The CPU attention kernels (serving/attention/paged_attention.c), decode and prefill, against the
torch reference (kernels/reference.py), inside the torch backend against its own torch path, and
the fallback of the CPU path's C code when it cannot be built."""

import logging

import pytest
import torch

from counterpoint.decoding import SamplingParams
from counterpoint.kernels import reference as ref
from counterpoint.serving import LLM, native
from counterpoint.serving.attention import cpu_kernel
from counterpoint.serving.attention.base import AttentionMetadata, KVCache
from counterpoint.serving.models import cpu_gemv
from counterpoint.serving.attention.torch_backend import TorchAttention
from test_kernels import scattered_cache

needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None, reason="no C compiler here")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,lengths", [
    (9, 3, 64, 16, [1, 17, 40, 16]),  # GQA 3 (SmolLM2), partial and exactly full last blocks
    (4, 4, 32, 8, [33]),  # no GQA, a head size outside the specialised ones, one sequence
    (8, 1, 128, 16, [5, 70, 129]),  # GQA 8, head size 128
    (8, 2, 80, 4, [300, 2]),  # head size 80, tiny blocks, long and short together
    (6, 1, 64, 16, [77]),  # one sequence and one kv head: a single task for six query heads
])
def test_kernel_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, lengths):
    cache, tables = (t.cpu() for t in scattered_cache(lengths, num_kv_heads, head_dim, block_size, dtype))
    # NOTE: q as the model hands it over: a strided view of a wider (T, heads + kv_heads, D) tensor
    qk = torch.randn(len(lengths), num_heads + num_kv_heads, head_dim).to(dtype)
    q = qk[:, :num_heads]
    scale = head_dim**-0.5
    lens = torch.tensor(lengths, dtype=torch.int32)
    expected = ref.paged_decode(q.float(), cache.float(), tables, lens, scale)
    got = cpu_kernel.PagedDecode(tables.long(), lengths, scale).attend(q, cache)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,qlen,context", [
    (9, 3, 64, 16, 70, 70),  # a whole prompt over three query blocks of the kernel (SmolLM2's heads)
    (4, 4, 32, 8, 37, 100),  # a later chunk after 63 cached tokens, no GQA, an unspecialised head size
    (8, 1, 128, 16, 5, 5),  # GQA 8, head size 128, a prompt shorter than one tile of keys
    (8, 2, 80, 4, 33, 47),  # head size 80, tiny blocks: a tile of keys spans four of them
    (6, 2, 64, 16, 1, 19),  # a chunk of one token
])
def test_prefill_kernel_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, qlen, context):
    cache, tables = (t.cpu() for t in scattered_cache([context], num_kv_heads, head_dim, block_size, dtype))
    qk = torch.randn(qlen, num_heads + num_kv_heads, head_dim).to(dtype)
    q = qk[:, :num_heads]  # NOTE: strided, as the model hands it over
    scale = head_dim**-0.5
    expected = ref.paged_prefill(q.float(), cache.float(), tables, torch.tensor([0]), torch.tensor([qlen]),
                                 torch.tensor([context]), scale)
    got = cpu_kernel.prefill(q, cache, tables[0], context, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_kernel
def test_backend_kernel_agrees_with_its_gather_path():
    """A step of three decodes and a prefill chunk: the same layer through the kernels and through
    the torch path (a gathered tile for the decodes, scaled_dot_product_attention for the chunk)."""
    num_heads, num_kv_heads, head_dim, bs = 6, 2, 64, 8
    cache = KVCache(1, 40, bs, num_kv_heads, head_dim, torch.float32, torch.device("cpu"))
    cache.data.normal_()
    tables = torch.tensor([[3, 9, 0, 0], [12, 4, 30, 7], [20, 0, 0, 0], [33, 34, 0, 0]])
    context = [11, 29, 8, 13]  # the last one is a prefill of 5 new tokens after 8 cached
    query = [1, 1, 1, 5]
    slots = [9 * bs + 2, 7 * bs + 4, 20 * bs + 7] + [34 * bs + i for i in range(5)]  # by each table
    meta = AttentionMetadata(torch.tensor(slots), tables, query, context, 3, bs)
    q, k, v = (torch.randn(8, h, head_dim) for h in (num_heads, num_kv_heads, num_kv_heads))

    def run(with_kernel: bool) -> torch.Tensor:
        backend = TorchAttention(head_dim**-0.5)
        backend.use_kernel = with_kernel
        backend.prepare(meta, cache)
        assert (backend.paged is not None) == with_kernel
        return backend.attend(0, q, k, v)

    torch.testing.assert_close(run(True), run(False), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("cached", [0, 37])
def test_backend_prefill_of_a_long_bf16_chunk_matches_reference(cached):
    """A bfloat16 chunk of SDPA_TOKENS new tokens, the first of its sequence or after cached ones:
    where the CPU has AMX the backend hands it to scaled_dot_product_attention, elsewhere to the
    kernel; either way the same layer as the reference computes from the cache."""
    num_heads, num_kv_heads, head_dim, bs = 9, 3, 64, 16
    qlen = cpu_kernel.SDPA_TOKENS
    context = cached + qlen
    num_blocks = -(-context // bs)
    cache = KVCache(1, num_blocks + 3, bs, num_kv_heads, head_dim, torch.bfloat16, torch.device("cpu"))
    cache.data.normal_()
    tables = torch.randperm(num_blocks + 3)[None, :num_blocks]
    positions = torch.arange(cached, context)
    slots = tables[0, positions // bs] * bs + positions % bs
    meta = AttentionMetadata(slots, tables, [qlen], [context], 0, bs)
    q, k, v = (torch.randn(qlen, h, head_dim).to(torch.bfloat16) for h in (num_heads, num_kv_heads, num_kv_heads))
    backend = TorchAttention(head_dim**-0.5)
    backend.prepare(meta, cache)
    got = backend.attend(0, q, k, v)
    expected = ref.paged_prefill(q.float(), cache.layer(0).float(), tables, torch.tensor([0]), torch.tensor([qlen]),
                                 torch.tensor([context]), head_dim**-0.5)
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def test_without_a_compiler_the_engine_falls_back_and_still_matches(llama_dir, tmp_path, monkeypatch, caplog):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 33, 100, 7], list(range(40, 70))]
    with_native = LLM(str(llama_dir), show_progress=False).generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("COUNTERPOINT_CACHE", str(tmp_path))  # NOTE: nothing built yet here
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native.load.cache_clear()
    logging.getLogger("counterpoint").addHandler(caplog.handler)  # NOTE: serve's set-up stops propagation
    try:
        assert cpu_kernel.library() is None
        assert "could not build paged_attention.c" in caplog.text
        without = LLM(str(llama_dir), show_progress=False).generate(prompts, params, use_tqdm=False)
        assert "could not build cpu_norm.c" in caplog.text
    finally:
        logging.getLogger("counterpoint").removeHandler(caplog.handler)
        native.load.cache_clear()
    assert [o.outputs[0].token_ids for o in without] == [o.outputs[0].token_ids for o in with_native]


def test_bench_kernels_measures_the_cpu_path(llama_dir):
    """`bench kernels --device cpu --model DIR`: the C kernels against the torch path, the model's
    linear layers with the C loop for few rows and with oneDNN alone, and its decode steps against
    transformers (a smoke run at toy size; its figures mean nothing)."""
    from argparse import Namespace

    from counterpoint.serving.bench.kernels import kernels

    args = Namespace(device="cpu", allow_cpu=False, dtype="bfloat16", peak_gbs=None, attention_shapes=[(3, 40)],
                     heads=4, kv_heads=2, head_dim=64, batch_sizes=[2], input_len=8, steps=2, iters=1,
                     model=str(llama_dir), linear_rows=[1, cpu_gemv.max_rows() + 1], prefill_lens=[20])
    result = kernels(args)
    assert result["path"] == "cpu" and result["peak_gbs"] > 0  # measured here: no --peak-gbs given
    row = result["attention"][0]
    assert row["cpu_kernel_us"] > 0 and row["torch_us"] > 0 and row["vs_torch"] > 0
    assert result["prefill"][0]["cpu_kernel_ms"] > 0 and result["prefill"][0]["torch_ms"] > 0
    few, many = result["linear"]
    assert few["gemv"] == bool(cpu_gemv.available()) and not many["gemv"]
    assert all(row[f"{name}_ms"] > 0 for row in (few, many) for name in ("counterpoint", "onednn"))
    step = result["decode"][0]
    assert step["batch"] == 2 and step["counterpoint_ms"] > 0 and step["counterpoint_gather_ms"] > 0
