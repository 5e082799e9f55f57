"""Offline benchmarks: `bench throughput` (against transformers' generate in the same run) and
`bench latency`. Both print a table and can write JSON."""

import json
import statistics
import time

import torch
from tqdm import tqdm

from counterpoint.decoding import SamplingParams
from counterpoint.serving.bench.serve import percentile
from counterpoint.serving.bench.workload import Workload, bundled_workload, random_workload
from counterpoint.serving.flags import engine_kwargs


def run_counterpoint(llm, work: Workload) -> float:
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == work.num_output_tokens
    return elapsed


def run_transformers(model, work: Workload, batch_size: int, pad_id: int) -> float:
    """Static batches of `batch_size`, left-padded, each run to its longest output, as a
    transformers user would serve them; only each request's own tokens count as output."""
    model.generation_config.eos_token_id = None  # like ignore_eos
    start = time.perf_counter()
    for i in tqdm(range(0, len(work.prompts), batch_size), desc="transformers", leave=False):
        prompts, lens = work.prompts[i : i + batch_size], work.output_lens[i : i + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start  # NOTE: generate returns host-visible ids, so the device is synchronised


def throughput(args) -> dict:
    from counterpoint.serving.llm import LLM

    results = []
    for concurrency in args.concurrency:
        num_prompts = args.num_prompts or max(8, 4 * concurrency)
        llm = LLM(args.model, max_num_seqs=concurrency, show_progress=False, **engine_kwargs(args))
        if args.dataset == "bundled":
            work = bundled_workload(llm.get_tokenizer(), num_prompts, args.output_len, args.seed)
        else:
            work = random_workload(num_prompts, args.input_len, args.output_len, args.range_ratio,
                                   llm.engine.main.vocab_size, args.seed)
        ours, device = run_counterpoint(llm, work), llm.engine.device
        row = dict(concurrency=concurrency, num_prompts=num_prompts, output_tokens=work.num_output_tokens,
                   counterpoint_s=ours, counterpoint_tok_s=work.num_output_tokens / ours)
        del llm
        if args.baseline == "transformers":
            row.update(_transformers_row(args, work, concurrency, device))
            row["ratio"] = row["counterpoint_tok_s"] / row["transformers_tok_s"]
        results.append(row)
        _print_row(row)
    return dict(benchmark="throughput", model=args.model, dtype=args.dtype, dataset=args.dataset,
                input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                threads=torch.get_num_threads(), results=results)


def _transformers_row(args, work: Workload, concurrency: int, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM
    from counterpoint.serving.models.loader import DTYPES

    dtype = DTYPES.get(args.dtype, "auto")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    pad_id = model.generation_config.pad_token_id or 0
    elapsed = run_transformers(model, work, concurrency, pad_id)
    tok_s = work.num_output_tokens / elapsed
    return dict(transformers_s=elapsed, transformers_tok_s=tok_s)


def _print_row(row: dict) -> None:
    line = f"concurrency {row['concurrency']:>3}: counterpoint {row['counterpoint_tok_s']:8.1f} tok/s"
    if "ratio" in row:
        line += f" | transformers {row['transformers_tok_s']:8.1f} tok/s | ratio {row['ratio']:.2f}x"
    print(line, flush=True)


def latency(args) -> dict:
    from counterpoint.serving.llm import LLM

    llm = LLM(args.model, max_num_seqs=max(args.batch_size, 1), show_progress=False, **engine_kwargs(args))
    work = random_workload(args.batch_size, args.input_len, args.output_len, 0.0, llm.engine.main.vocab_size, args.seed)
    params = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for _ in range(args.warmup):
        llm.generate(work.prompts, params, use_tqdm=False)
    times, ttfts = [], []
    for _ in tqdm(range(args.iters), desc="latency"):
        start = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        ttfts += [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    result = dict(benchmark="latency", model=args.model, batch_size=args.batch_size, input_len=args.input_len,
                  output_len=args.output_len, mean_s=statistics.mean(times), p50_s=percentile(times, 50),
                  p90_s=percentile(times, 90), p99_s=percentile(times, 99), mean_ttft_s=statistics.mean(ttfts),
                  per_token_ms=1000 * statistics.mean(times) / args.output_len)
    print(json.dumps(result, indent=2))
    return result
