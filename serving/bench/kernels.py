"""`bench kernels`: the decode path against its bounds, on the GPU or on the CPU.

1. Decode attention bandwidth: bytes of K and V read per second by the attention kernel, as a
   fraction of the memory peak (`--peak-gbs`), next to the torch path on the same cache. On
   CUDA the kernel is the Triton backend's (paged decode and KV store); on the CPU it is the C
   decode kernel of the torch backend, against that backend's gather path.
2. Prefill attention of one prompt of each `--prefill-lens` length (KV store and causal attention),
   the kernel against the torch path (scaled_dot_product_attention). On a CPU with AMX, bfloat16
   prompts from 128 tokens take scaled_dot_product_attention in both (cpu_kernel.prefers_sdpa).
3. On the CPU, the linear layers of a decode step: every weight of the model multiplied by a few
   rows, through the C loop for few rows (cpu_gemv.c) and through oneDNN's packed linear alone,
   in GB/s of weights read.
4. Decode step time of a Llama-shaped random model (Llama 3.2 1B by default), or of `--model`,
   at several batch sizes: the engine (on CUDA with CUDA graphs and without, --enforce-eager; on
   the CPU with the C kernel and without), transformers' generate on the same device, and the
   bound of reading every weight once per step at the memory peak.
"""

import gc
import tempfile
import time

import torch
from torch import nn
from tqdm import tqdm

from counterpoint.decoding import SamplingParams
from counterpoint.serving.attention import create_backend
from counterpoint.serving.attention.base import AttentionMetadata, KVCache
from counterpoint.serving.bench.workload import random_workload
from counterpoint.serving.models import cpu_gemv
from counterpoint.serving.models.cpu_linear import PackedLinear

H100_GBS = 3350.0  # an H100 SXM's memory peak: --peak-gbs on CUDA without one


def cpu_read_gbs() -> float:
    """The memory bandwidth torch's threads read at: the best of five sums over 512 MiB, far larger
    than any cache."""
    data = torch.ones(2**27)
    seconds = min(_timed(data.sum, torch.device("cpu"), 1) for _ in range(5))
    return data.numel() * data.element_size() / seconds / 1e9


def _timed(fn, device: torch.device, iters: int) -> float:
    """Mean seconds per call after one warm-up call. On CUDA the call is captured in a CUDA graph
    and replayed, as the engine's decode steps are: launched one by one from Python, a few
    kernels of 100 us each measure the host's launch overhead instead."""
    fn()
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
        fn()
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _attention_backends(scale: float, triton: bool) -> dict:
    """{label: backend}: the kernel under test first, then the torch path it is measured against."""
    if triton:
        return {"triton": create_backend("triton", scale), "torch": create_backend("torch", scale)}
    gather = create_backend("torch", scale)
    gather.use_kernel = False
    return {"cpu_kernel": create_backend("torch", scale), "torch": gather}


def attention_bandwidth(args, device: torch.device, dtype: torch.dtype, triton: bool) -> list[dict]:
    """Each backend's decode attention (KV store of the new token + attention over the context),
    through the interface the model calls: the kernel against the torch path."""
    rows = []
    for batch, context in tqdm(args.attention_shapes, desc="decode attention"):
        cache, meta, (q, k, v) = _decode_step(batch, context, args.kv_heads, args.heads, args.head_dim, dtype, device)
        kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * cache.data.element_size()
        row = dict(batch=batch, context=context)
        backends = _attention_backends(args.head_dim**-0.5, triton)
        for name, backend in backends.items():
            backend.prepare(meta, cache)
            seconds = _timed(lambda: backend.attend(0, q, k, v), device, args.iters)
            row |= {f"{name}_us": seconds * 1e6, f"{name}_kv_gb_s": kv_bytes / seconds / 1e9}
        kernel = next(iter(backends))
        row |= dict(of_peak=row[f"{kernel}_kv_gb_s"] / args.peak_gbs, vs_torch=row["torch_us"] / row[f"{kernel}_us"])
        rows.append(row)
        print(f"decode attention batch {batch:>3} context {context:>6}: {kernel} {row[f'{kernel}_us']:8.1f} us, "
              f"{row[f'{kernel}_kv_gb_s']:7.1f} GB/s of K/V ({100 * row['of_peak']:.0f}% of {args.peak_gbs:.0f} GB/s)"
              f" | torch path {row['torch_us']:8.1f} us ({row['vs_torch']:.1f}x)", flush=True)
    return rows


def prefill_attention(args, device: torch.device, dtype: torch.dtype, triton: bool) -> list[dict]:
    """One layer's attention over a whole prompt, through each backend's `attend`."""
    rows = []
    for length in tqdm(args.prefill_lens, desc="prefill attention"):
        block_size = 16
        num_blocks = -(-length // block_size)
        cache = KVCache(1, num_blocks, block_size, args.kv_heads, args.head_dim, dtype, device)
        tables = torch.randperm(num_blocks, device=device)[None]
        positions = torch.arange(length, device=device)
        slots = tables[0, positions // block_size] * block_size + positions % block_size
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, query_lens=[length], context_lens=[length],
                                 num_decodes=0, block_size=block_size)
        q, k, v = (torch.randn(length, h, args.head_dim, device=device, dtype=dtype)
                   for h in (args.heads, args.kv_heads, args.kv_heads))
        row = dict(tokens=length)
        backends = _attention_backends(args.head_dim**-0.5, triton)
        for name, backend in backends.items():
            backend.prepare(meta, cache)
            row[f"{name}_ms"] = _timed(lambda: backend.attend(0, q, k, v), device, max(1, args.iters // 4)) * 1e3
        kernel = next(iter(backends))
        row["vs_torch"] = row["torch_ms"] / row[f"{kernel}_ms"]
        rows.append(row)
        print(f"prefill attention {length:>6} tokens: {kernel} {row[f'{kernel}_ms']:8.2f} ms | torch path "
              f"{row['torch_ms']:8.2f} ms ({row['vs_torch']:.1f}x)", flush=True)
    return rows


def _step_linears(config) -> list[tuple[int, int]]:
    """(out, in) of every linear layer a decode step runs: q/k/v, o, gate/up, down per layer, lm_head."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    return per_layer * config.num_hidden_layers + [(config.vocab_size, hidden)]


def linear_bandwidth(args, config, dtype: torch.dtype) -> list[dict]:
    """A decode step's linear layers at `--linear-rows` rows: PackedLinear as the engine runs it (the
    C loop up to cpu_gemv.max_rows() rows where the CPU has it) against oneDNN's linear on weights
    packed for it (what PackedLinear runs where the C loop does not)."""
    shapes = _step_linears(config)
    layers = [PackedLinear(nn.Linear(i, o, bias=False, dtype=dtype)) for o, i in tqdm(shapes, desc="linear layers")]
    onednn = [PackedLinear(nn.Linear(i, o, bias=False, dtype=dtype), c_loop=False) for o, i in shapes]
    weight_bytes = sum(o * i for o, i in shapes) * torch.finfo(dtype).bits // 8
    rows_out = []
    for rows in args.linear_rows:
        inputs = {i: torch.randn(rows, i, dtype=dtype) for _, i in shapes}
        row = dict(rows=rows, gemv=all(layer.gemv for layer in layers) and rows <= cpu_gemv.max_rows())
        for name, stack in (("counterpoint", layers), ("onednn", onednn)):
            with torch.inference_mode():
                seconds = _timed(lambda: [layer(inputs[layer.in_features]) for layer in stack], torch.device("cpu"),
                                 max(1, args.iters // 4))
            row |= {f"{name}_ms": seconds * 1e3, f"{name}_gb_s": weight_bytes / seconds / 1e9}
        row["vs_onednn"] = row["onednn_ms"] / row["counterpoint_ms"]
        rows_out.append(row)
        print(f"linear layers, {rows:>3} rows: counterpoint {row['counterpoint_ms']:7.2f} ms "
              f"({row['counterpoint_gb_s']:5.1f} GB/s{', C loop' if row['gemv'] else ''}) | oneDNN packed "
              f"{row['onednn_ms']:7.2f} ms ({row['vs_onednn']:.2f}x)", flush=True)
    return rows_out


def _decode_step(batch: int, context: int, kv_heads: int, heads: int, head_dim: int, dtype, device):
    """A random one-layer cache whose sequences' blocks are shuffled over the pool, and one decode
    step's metadata and (q, k, v) for the token at position context - 1 of each sequence."""
    block_size = 16
    blocks_per_seq = -(-context // block_size)
    cache = KVCache(1, batch * blocks_per_seq, block_size, kv_heads, head_dim, dtype, device)
    cache.data.normal_()
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    last = context - 1
    slots = tables[:, last // block_size] * block_size + last % block_size
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, query_lens=[1] * batch,
                             context_lens=[context] * batch, num_decodes=batch, block_size=block_size)
    new = lambda h: torch.randn(batch, h, head_dim, device=device, dtype=dtype)  # noqa: E731
    return cache, meta, (new(heads), new(kv_heads), new(kv_heads))


def _random_checkpoint(shape: dict, dtype: torch.dtype, out: str):
    """A random Llama of `shape` with a stand-in word-level tokenizer (prompts are token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(out)
    return model


def _engine_step_ms(path: str, dtype: torch.dtype, device: torch.device, batch: int, args, eager: bool,
                    gather: bool = False) -> float:
    """gather: the CPU's decode attention through the torch backend's gather path, not its C kernel."""
    from counterpoint.serving.llm import LLM

    llm = LLM(path, dtype=str(dtype).removeprefix("torch."), device=device.type, max_num_seqs=batch,
              max_num_batched_tokens=max(2048, batch * args.input_len), enforce_eager=eager, show_progress=False)
    engine = llm.engine
    if gather:
        for slot in engine.all_slots.values():
            slot.runner.backend.use_kernel = False
    params = SamplingParams(max_tokens=args.steps + 2, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(random_workload(batch, args.input_len, 1, 0.0, engine.main.vocab_size, 0).prompts):
        engine.add_request(str(i), prompt, params)
    engine.step()  # prefill (and the first token)
    engine.step()  # one decode step to warm up
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()  # NOTE: each step returns host token ids, so it is synchronised
    elapsed = time.perf_counter() - start
    del engine, llm
    gc.collect()  # NOTE: the next engine must not share the GPU with this one's cache and graphs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed / args.steps * 1e3


class _StepClock:
    """A generate() streamer that notes the time each new token comes out, so decode steps are
    timed directly (not as a difference of two runs, which load on the machine can make negative)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, _tokens) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _transformers_step_ms(model, device: torch.device, batch: int, args) -> float:
    prompts = random_workload(batch, args.input_len, 1, 0.0, model.config.vocab_size, 0).prompts
    ids = torch.tensor(prompts, device=device)
    model.generation_config.eos_token_id = None

    def generate(n: int) -> list[float]:
        clock = _StepClock(device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=clock)
        return clock.times

    generate(2)  # warm-up
    # NOTE: put() is called with the prompt, then once per new token; from the first new token on,
    # each gap is one decode step.
    times = generate(args.steps + 1)[1:]
    return (times[-1] - times[0]) / (len(times) - 1) * 1e3


def _checkpoint(args, dtype: torch.dtype, tmp: str):
    """(path, transformers model): the --model checkpoint, or a random one of the default shape."""
    if getattr(args, "model", None):
        from transformers import AutoModelForCausalLM

        return args.model, AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return tmp, _random_checkpoint(args.shape, dtype, tmp)


def decode_steps(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, hf = _checkpoint(args, dtype, tmp)
        hf = hf.to(device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        bound_ms = weight_bytes / (args.peak_gbs * 1e9) * 1e3
        for batch in tqdm(args.batch_sizes, desc="decode steps"):
            ours = _engine_step_ms(path, dtype, device, batch, args, eager=False)
            # NOTE: the step without the path's own speed-up: on CUDA without graphs, on the CPU without
            # the C attention kernel
            cuda = device.type == "cuda"
            plain = _engine_step_ms(path, dtype, device, batch, args, eager=cuda, gather=not cuda)
            theirs = _transformers_step_ms(hf, device, batch, args)
            label = "eager" if cuda else "gather"
            row = dict(batch=batch, counterpoint_ms=ours, transformers_ms=theirs, weight_bound_ms=bound_ms,
                       of_bound=bound_ms / ours, vs_transformers=theirs / ours)
            row |= {f"counterpoint_{label}_ms": plain, ("graphs" if cuda else "kernel") + "_speedup": plain / ours}
            rows.append(row)
            print(f"decode step batch {batch:>3}: counterpoint {ours:7.2f} ms ({label} {plain:7.2f} ms) | "
                  f"transformers {theirs:7.2f} ms | weight-read bound {bound_ms:6.2f} ms "
                  f"({100 * bound_ms / ours:.0f}% of bound)", flush=True)
    return rows


def kernels(args) -> dict:
    """On CUDA, the Triton path. On the CPU, the CPU path; with --allow-cpu, the Triton path under
    Triton's interpreter (TRITON_INTERPRET=1), a smoke test whose figures mean nothing."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    triton = device.type == "cuda" or args.allow_cpu
    dtype = getattr(torch, args.dtype)
    if args.peak_gbs is None:
        args.peak_gbs = H100_GBS if device.type == "cuda" else cpu_read_gbs()
    result = dict(benchmark="kernels", device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  path="triton" if triton else "cpu", dtype=args.dtype, peak_gbs=args.peak_gbs,
                  attention=attention_bandwidth(args, device, dtype, triton),
                  prefill=prefill_attention(args, device, dtype, triton))
    if not triton:
        result["linear"] = linear_bandwidth(args, _config(args), dtype)
    return result | dict(decode=decode_steps(args, device, dtype))


def _config(args):
    """The transformers config of --model, or of the default random shape."""
    from transformers import AutoConfig, LlamaConfig

    return AutoConfig.from_pretrained(args.model) if getattr(args, "model", None) else LlamaConfig(**args.shape)
