"""`bench quant`: every weight format of one model side by side, in one run: held-out perplexity
through the engine, decode tokens/s at each concurrency, load time, resident memory.

The quantized checkpoints are made first (GPTQ and round-to-nearest by `train quantize`, into
`--build-dir`, kept for the next run); bitsandbytes quantizes on load; the GGUF format is the
bundled file served directly. Each format then runs in a fresh process of its own, one after the
other, so that its load time and peak resident memory are its own.
"""

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

# name -> (how to make it, engine quantization flag); "float" is the model as given
FORMATS = {
    "bf16": (None, "none"),
    "gptq4": (dict(method="gptq", bits=4, group_size=128), "none"),
    "gptq4-act": (dict(method="gptq", bits=4, group_size=128, desc_act=True), "none"),
    "gptq8": (dict(method="gptq", bits=8, group_size=-1, sym=True), "none"),
    "rtn4": (dict(method="rtn", bits=4, group_size=128), "none"),
    "bnb-nf4": (None, "bnb-nf4"),
    "bnb-int8": (None, "bnb-int8"),
    "gguf-q4_1": ("gguf", "none"),
}


def quant(args) -> dict:
    from counterpoint.serving.cache import cache_dir
    from counterpoint.training.defaults import bundled_gguf, default_models

    model = Path(args.model) if args.model else default_models().expert
    build = Path(args.build_dir) if args.build_dir else cache_dir() / "quant" / model.name
    rows = []
    for name in args.formats:
        recipe, flag = FORMATS[name]
        path = bundled_gguf() if recipe == "gguf" else model if recipe is None else _build(model, build / name, recipe)
        row = _run_worker(name, path, flag, args)
        rows.append(row)
        _print_row(row)
    baseline = next((r for r in rows if r["format"] == "bf16"), None)
    if baseline:
        for row in rows:
            for c in args.concurrency:
                row[f"speedup_c{c}"] = row[f"tok_s_c{c}"] / baseline[f"tok_s_c{c}"]
    if args.plot:
        _plot(rows, args.concurrency, args.plot)
    return dict(benchmark="quant", model=str(model), dtype=args.dtype, concurrency=args.concurrency,
                input_len=args.input_len, output_len=args.output_len, ppl_rows=args.ppl_rows, seq_len=args.seq_len,
                threads=args.threads,
                results=rows)


def _build(model: Path, out: Path, recipe: dict) -> Path:
    from counterpoint.training.quantize import QuantizeConfig, quantize

    if not (out / "config.json").is_file():
        print(f"building {out.name} ...", flush=True)
        quantize(QuantizeConfig(model=model, out=out, **recipe))
    return out


def _run_worker(name: str, path: Path, flag: str, args) -> dict:
    spec = dict(format=name, path=str(path), quantization=flag, concurrency=args.concurrency,
                input_len=args.input_len, output_len=args.output_len, ppl_rows=args.ppl_rows, seq_len=args.seq_len,
                ppl_files=args.ppl_files, dtype=args.dtype, threads=args.threads, seed=args.seed)
    proc = subprocess.run([sys.executable, "-m", "counterpoint.serving.bench.quant", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench quant: the {name} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(spec: dict) -> dict:
    """One format in this process: load, perplexity, decode tokens/s."""
    from counterpoint.serving.engine.model_slot import weight_bytes
    from counterpoint.serving.llm import LLM

    start = time.perf_counter()
    llm = LLM(spec["path"], quantization=spec["quantization"], dtype=spec["dtype"],
              max_num_seqs=max(spec["concurrency"]), show_progress=False)
    row = dict(format=spec["format"], load_s=time.perf_counter() - start,
               rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               weight_mib=weight_bytes(llm.engine.main.model) / 2**20,
               kinds=sorted({m.kind for m in llm.engine.main.model.modules() if hasattr(m, "kind") and m.kind}))
    row["perplexity"] = _perplexity(llm, spec)
    for concurrency in spec["concurrency"]:
        row[f"tok_s_c{concurrency}"] = _decode_rate(llm, concurrency, spec)
    return row


def _perplexity(llm, spec: dict) -> float:
    from counterpoint.decoding import SamplingParams
    from counterpoint.training.data import default_corpus, pack, read_texts
    from counterpoint.training.perplexity import MAX_CORPUS_BYTES, VAL_FRACTION

    texts = read_texts([Path(f) for f in spec["ppl_files"]] or default_corpus(), MAX_CORPUS_BYTES)
    _, rows = pack(texts, llm.get_tokenizer(), spec["seq_len"], VAL_FRACTION, 0)
    prompts = [row.tolist() for row in rows[: spec["ppl_rows"]]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = [-entry[token].logprob for out, prompt in zip(outs, prompts)
           for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    return math.exp(sum(nll) / len(nll))


def _decode_rate(llm, concurrency: int, spec: dict) -> float:
    """Output tokens/s of 2 x concurrency random prompts, `concurrency` in flight, after a warm-up."""
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving.bench.workload import random_workload

    work = random_workload(2 * concurrency, spec["input_len"], spec["output_len"], 0.0, llm.engine.main.vocab_size,
                           spec["seed"])
    params = SamplingParams(max_tokens=spec["output_len"], temperature=0, ignore_eos=True)
    llm.generate(work.prompts[:concurrency], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def _print_row(row: dict) -> None:
    rates = "  ".join(f"{k.removeprefix('tok_s_')} {v:6.1f} tok/s" for k, v in row.items() if k.startswith("tok_s_"))
    tqdm.write(f"{row['format']:>10}  ppl {row['perplexity']:8.3f}  {rates}  load {row['load_s']:5.1f} s  "
               f"weights {row['weight_mib']:6.0f} MiB  peak RSS {row['rss_mib']:6.0f} MiB  ({'; '.join(row['kinds'])})")


def _plot(rows: list[dict], concurrency: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["format"] for r in rows]
    left.bar(names, [r["perplexity"] for r in rows])
    left.set_ylabel("held-out perplexity")
    width = 0.8 / len(concurrency)
    for i, c in enumerate(concurrency):
        right.bar([x + i * width for x in range(len(rows))], [r[f"tok_s_c{c}"] for r in rows], width,
                  label=f"{c} in flight")
    right.set_xticks([x + width * (len(concurrency) - 1) / 2 for x in range(len(rows))], names)
    right.set_ylabel("decode tokens/s")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    print(json.dumps(worker(spec)))
