"""`counterpoint bench ...`: the benchmarks' flags, and the dispatch to each benchmark module."""

import argparse
import json

from counterpoint.serving.flags import add_engine_flags, positive_float, positive_int

# The shape `bench kernels` times: Llama 3.2 1B with random weights.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=4096)


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="offline benchmarks").add_subparsers(dest="bench", required=True)
    t = bench.add_parser("throughput", help="output tokens/s against transformers' generate, in one run")
    t.add_argument("--model", required=True, help="local Hugging Face model directory")
    t.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 64],
                   help="requests in flight (the engine's max_num_seqs, transformers' batch size); one run each")
    t.add_argument("--num-prompts", type=positive_int, default=None, help="default: 4 x concurrency, at least 8")
    t.add_argument("--input-len", type=positive_int, default=128, help="mean prompt length in tokens")
    t.add_argument("--output-len", type=positive_int, default=128, help="mean output length in tokens")
    t.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len*(1-r)..len*(1+r)")
    t.add_argument("--dataset", choices=["random", "bundled"], default="random",
                   help="random-token prompts, or the bundled text prompts of bench serve (fixed output length)")
    t.add_argument("--baseline", choices=["transformers", "none"], default="transformers",
                   help="run transformers' generate on the same workload (none: the engine alone)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random workload")
    t.add_argument("--json", default=None, help="write the results here")
    add_engine_flags(t)
    srv = bench.add_parser("serve", help="load an OpenAI-compatible server (this one or another)")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000",
                     help="the server's URL, without /v1")
    srv.add_argument("--model", required=True, help="the served model id")
    srv.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    srv.add_argument("--num-prompts", type=positive_int, default=64, help="requests to send")
    prompts = srv.add_mutually_exclusive_group()
    prompts.add_argument("--dataset", default=None, help='JSONL with {"prompt": ...} per line (default: bundled set)')
    prompts.add_argument("--input-len", type=positive_int, default=None,
                         help="send random prompts of exactly this many token ids instead")
    srv.add_argument("--max-token-id", type=positive_int, default=9999,
                     help="--input-len prompts draw ids from a tenth of this up to it (keep it below the vocabulary)")
    srv.add_argument("--output-len", type=positive_int, default=128, help="output tokens per request (EOS ignored)")
    srv.add_argument("--beam-width", type=positive_int, default=None,
                     help="beam search of this width instead of greedy (one response per request, all beams counted)")
    load = srv.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    load.add_argument("--max-concurrency", type=positive_int, default=None, help="requests in flight at most")
    srv.add_argument("--seed", type=int, default=0, help="seed of the prompt order and arrivals")
    srv.add_argument("--plot", default=None, help="write latency/throughput plots to this PNG")
    srv.add_argument("--json", default=None, help="write the results here")
    _compare_bench_parser(bench)
    lat = bench.add_parser("latency", help="end-to-end latency of one batch, time to first token")
    lat.add_argument("--model", required=True, help="local Hugging Face model directory")
    lat.add_argument("--batch-size", type=positive_int, default=1, help="requests in the batch")
    lat.add_argument("--input-len", type=positive_int, default=128, help="prompt length in tokens")
    lat.add_argument("--output-len", type=positive_int, default=64, help="output length in tokens")
    lat.add_argument("--iters", type=positive_int, default=5, help="timed runs")
    lat.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    lat.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    lat.add_argument("--json", default=None, help="write the results here")
    add_engine_flags(lat)
    _decoding_bench_parsers(bench)


def _decoding_bench_parsers(bench) -> None:
    b = bench.add_parser("beam", help="beam search against transformers' beam search, in one run; KV blocks shared")
    b.add_argument("--model", required=True, help="local Hugging Face model directory")
    b.add_argument("--widths", type=positive_int, nargs="+", default=[4, 8], help="beam widths, one run each")
    b.add_argument("--concurrency", type=positive_int, default=16, help="requests, all submitted at once")
    c = bench.add_parser("contrastive", help="contrastive decoding tokens/s over greedy tokens/s, same expert")
    c.add_argument("--model", required=True, help="the expert")
    c.add_argument("--amateur", required=True,
                   help="the amateur's model directory")
    c.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16],
                   help="requests in flight; one run each")
    c.add_argument("--num-prompts", type=positive_int, default=None, help="default: 2 x concurrency, at least 4")
    c.add_argument("--alpha", type=float, default=0.1, help="contrastive plausibility threshold")
    c.add_argument("--beta", type=float, default=1.0, help="contrastive amateur weight")
    for p in (b, c):
        p.add_argument("--input-len", type=positive_int, default=128, help="prompt length in tokens")
    r = bench.add_parser("context-contrast", help="ACD / CAD / AdaCAD tokens/s over plain RAG greedy tokens/s")
    r.add_argument("--model", required=True, help="local Hugging Face model directory")
    r.add_argument("--method", choices=["acd", "cad", "adacad"], default="acd", help="the context contrast timed")
    r.add_argument("--alpha", type=float, default=0.5, help="CAD's alpha")
    r.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16],
                   help="requests in flight; one run each")
    r.add_argument("--num-prompts", type=positive_int, default=None, help="default: 2 x concurrency, at least 4")
    r.add_argument("--document-len", type=positive_int, default=256, help="tokens of the documents block")
    r.add_argument("--question-len", type=positive_int, default=32, help="tokens of the question after it")
    st = bench.add_parser("structured", help="greedy tokens/s under a JSON schema over unconstrained greedy tokens/s")
    st.add_argument("--model", required=True, help="local Hugging Face model directory")
    st.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16],
                    help="requests in flight; one run each")
    st.add_argument("--num-prompts", type=positive_int, default=None, help="default: 2 x concurrency, at least 4")
    st.add_argument("--input-len", type=positive_int, default=128, help="prompt length in tokens")
    _kernels_bench_parser(bench)
    _quant_bench_parser(bench)
    for p in (b, c, r, st):
        p.add_argument("--output-len", type=positive_int, default=64, help="output tokens (EOS ignored)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
        p.add_argument("--json", default=None, help="write the results here")
        add_engine_flags(p)


def _compare_bench_parser(bench) -> None:
    from counterpoint.serving.bench.compare import server_spec

    c = bench.add_parser("compare", help="servers one at a time under the same load, rounds interleaved")
    c.add_argument("--server", type=server_spec, action="append", required=True, metavar="NAME=COMMAND",
                   help="a server's shell command, with {port} where its port goes; repeat (the first is judged)")
    c.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32], help="requests in flight")
    c.add_argument("--rounds", type=positive_int, default=2, help="times every server runs, interleaved")
    c.add_argument("--input-len", type=positive_int, default=128, help="prompt length in token ids")
    c.add_argument("--output-len", type=positive_int, default=128, help="output tokens per request (EOS ignored)")
    c.add_argument("--beam-width", type=positive_int, default=None,
                   help="beam search of this width instead of greedy (one response per request, all beams counted)")
    c.add_argument("--max-token-id", type=positive_int, default=9999,
                   help="prompts draw ids from a tenth of this up to it (keep it below the vocabulary)")
    c.add_argument("--prompts-per-slot", type=positive_int, default=2, help="requests per unit of concurrency")
    c.add_argument("--min-prompts", type=positive_int, default=8, help="requests per load at least")
    c.add_argument("--startup-timeout", type=positive_float, default=600, help="seconds a server may take to start")
    c.add_argument("--log-dir", default=".", help="where each server's output goes (NAME.log)")
    c.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    c.add_argument("--json", default=None, help="write the results here")


def _shape_pair(text: str) -> tuple[int, int]:
    batch, _, context = text.partition(":")
    try:
        return positive_int(batch), positive_int(context)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be BATCH:CONTEXT, e.g. 16:4096; got {text}") from err


def _kernels_bench_parser(bench) -> None:
    k = bench.add_parser("kernels", help="decode attention bandwidth and decode step time against bounds "
                                         "(GPU, or the CPU path)")
    k.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"], help="cache and weights")
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    k.add_argument("--peak-gbs", type=float, default=None,
                   help="memory peak in GB/s (default: on CUDA 3350, an H100 SXM's, the H200's is 4800; on a CPU "
                        "measured, the best of five sums over 512 MiB)")
    k.add_argument("--attention-shapes", type=_shape_pair, nargs="+", default=[(1, 32768), (16, 4096), (64, 2048)],
                   help="BATCH:CONTEXT pairs timed for decode attention")
    k.add_argument("--prefill-lens", type=positive_int, nargs="+", default=[128, 512, 2048],
                   help="prompt lengths timed for prefill attention")
    k.add_argument("--heads", type=positive_int, default=32, help="query heads of the attention shapes")
    k.add_argument("--kv-heads", type=positive_int, default=8, help="KV heads of the attention shapes")
    k.add_argument("--head-dim", type=positive_int, default=128, help="head size of the attention shapes")
    k.add_argument("--model", default=None,
                   help="time this checkpoint's decode steps (default: a random model of Llama 3.2 1B's shape)")
    k.add_argument("--linear-rows", type=positive_int, nargs="+", default=[1, 4, 16, 32],
                   help="rows the CPU's linear layers are timed at")
    k.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16, 64], help="decode-step batches timed")
    k.add_argument("--input-len", type=positive_int, default=128, help="prompt length before the timed steps")
    k.add_argument("--steps", type=positive_int, default=32, help="decode steps timed per batch size")
    k.add_argument("--iters", type=positive_int, default=20, help="timed calls per attention shape")
    k.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    k.add_argument("--json", default=None, help="write the results here")
    k.set_defaults(shape=LLAMA_1B)


def _quant_bench_parser(bench) -> None:
    from counterpoint.serving.bench.quant import FORMATS

    q = bench.add_parser("quant", help="weight formats side by side: perplexity, decode tokens/s, load time, memory")
    q.add_argument("--model", default=None, help="float Hugging Face model directory (default: the bundled model)")
    q.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="formats, in order")
    q.add_argument("--build-dir", default=None,
                   help="where the GPTQ / RTN checkpoints are made and kept (default: the cache)")
    q.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8], help="requests in flight")
    q.add_argument("--input-len", type=positive_int, default=128, help="prompt length in tokens")
    q.add_argument("--output-len", type=positive_int, default=64, help="output tokens (EOS ignored)")
    q.add_argument("--ppl-rows", type=positive_int, default=32, help="held-out rows of standard-library text scored")
    q.add_argument("--seq-len", type=positive_int, default=512, help="tokens per perplexity row")
    q.add_argument("--ppl-files", nargs="*", default=[],
                   help="text files for the perplexity (default: the standard library's .py files)")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="activations (auto: the checkpoint's, bfloat16 for quantized ones on the CPU)")
    q.add_argument("--threads", type=positive_int, default=1, help="torch threads of each format's run")
    q.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    q.add_argument("--plot", default=None, help="write perplexity and tokens/s bars to this PNG")
    q.add_argument("--json", default=None, help="write the results here")


def run_bench(args) -> None:
    from counterpoint.serving.bench import offline

    if args.bench == "compare":
        from counterpoint.serving.bench.compare import compare

        result = compare(args)
    elif args.bench == "serve":
        from counterpoint.serving.bench.serve import serve_benchmark

        result = serve_benchmark(args)
    elif args.bench in ("beam", "contrastive", "context-contrast", "structured"):
        from counterpoint.serving.bench import decoding

        result = getattr(decoding, args.bench.replace("-", "_"))(args)
    elif args.bench == "kernels":
        from counterpoint.serving.bench.kernels import kernels

        result = kernels(args)
    elif args.bench == "quant":
        from counterpoint.serving.bench.quant import quant

        result = quant(args)
    else:
        result = offline.throughput(args) if args.bench == "throughput" else offline.latency(args)
    write_json(result, args.json)


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")

