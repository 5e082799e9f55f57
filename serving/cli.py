"""The `counterpoint` command line (API.md): serve, generate, bench and train. Every bad flag
value ends in a one-line error and exit code 2."""

import argparse
import sys

from counterpoint.decoding import SamplingParams
from counterpoint.training.cli import add_train_parser, run_train


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: the Triton kernels on CUDA, the torch path on the CPU; torch forces the torch path")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: run every decode step eagerly (graphs are used on CUDA with triton)")


def engine_kwargs(args) -> dict:
    """The flags of _add_engine_flags as EngineConfig fields."""
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate offline and print the completion")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the bundled model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=positive_int, default=1)
    p.add_argument("--beam-width", type=positive_int, default=None, help="beam search of this width")
    p.add_argument("--amateur", default=None,
                   help="contrastive decoding against this model directory ('default': the bundled amateur)")
    p.add_argument("--cd-alpha", type=float, default=0.1)
    p.add_argument("--cd-beta", type=float, default=1.0)
    p.add_argument("--document", action="append", default=None)
    p.add_argument("--context-contrast", choices=["acd", "cad", "adacad"], default=None)
    _add_engine_flags(p)


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="offline benchmarks").add_subparsers(dest="bench", required=True)
    t = bench.add_parser("throughput", help="output tokens/s against transformers' generate, in one run")
    t.add_argument("--model", required=True)
    t.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 64])
    t.add_argument("--num-prompts", type=positive_int, default=None, help="default: 4 x concurrency, at least 8")
    t.add_argument("--input-len", type=positive_int, default=128)
    t.add_argument("--output-len", type=positive_int, default=128)
    t.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len*(1-r)..len*(1+r)")
    t.add_argument("--dataset", choices=["random", "bundled"], default="random",
                   help="random-token prompts, or the bundled text prompts of bench serve (fixed output length)")
    t.add_argument("--baseline", choices=["transformers", "none"], default="transformers")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", default=None, help="write the results here")
    _add_engine_flags(t)
    srv = bench.add_parser("serve", help="load an OpenAI-compatible server (this one or another)")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000")
    srv.add_argument("--model", required=True, help="the served model id")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--num-prompts", type=positive_int, default=64)
    srv.add_argument("--dataset", default=None, help='JSONL with {"prompt": ...} per line (default: bundled set)')
    srv.add_argument("--output-len", type=positive_int, default=128)
    load = srv.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    load.add_argument("--max-concurrency", type=positive_int, default=None)
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--plot", default=None, help="write latency/throughput plots to this PNG")
    srv.add_argument("--json", default=None)
    lat = bench.add_parser("latency", help="end-to-end latency of one batch, time to first token")
    lat.add_argument("--model", required=True)
    lat.add_argument("--batch-size", type=positive_int, default=1)
    lat.add_argument("--input-len", type=positive_int, default=128)
    lat.add_argument("--output-len", type=positive_int, default=64)
    lat.add_argument("--iters", type=positive_int, default=5)
    lat.add_argument("--warmup", type=int, default=1)
    lat.add_argument("--seed", type=int, default=0)
    lat.add_argument("--json", default=None)
    _add_engine_flags(lat)
    _decoding_bench_parsers(bench)


def _decoding_bench_parsers(bench) -> None:
    b = bench.add_parser("beam", help="beam search against transformers' beam search, in one run; KV blocks shared")
    b.add_argument("--model", required=True)
    b.add_argument("--widths", type=positive_int, nargs="+", default=[4, 8])
    b.add_argument("--concurrency", type=positive_int, default=16, help="requests, all submitted at once")
    c = bench.add_parser("contrastive", help="contrastive decoding tokens/s over greedy tokens/s, same expert")
    c.add_argument("--model", required=True, help="the expert")
    c.add_argument("--amateur", required=True)
    c.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 16])
    c.add_argument("--num-prompts", type=positive_int, default=None, help="default: 2 x concurrency, at least 4")
    c.add_argument("--alpha", type=float, default=0.1)
    c.add_argument("--beta", type=float, default=1.0)
    _kernels_bench_parser(bench)
    for p in (b, c):
        p.add_argument("--input-len", type=positive_int, default=128)
        p.add_argument("--output-len", type=positive_int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", default=None)
        _add_engine_flags(p)


def _shape_pair(text: str) -> tuple[int, int]:
    batch, _, context = text.partition(":")
    try:
        return positive_int(batch), positive_int(context)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be BATCH:CONTEXT, e.g. 16:4096; got {text}") from err


def _kernels_bench_parser(bench) -> None:
    from counterpoint.serving.bench_kernels import LLAMA_1B

    k = bench.add_parser("kernels", help="GPU: decode attention bandwidth and decode step time against bounds")
    k.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    k.add_argument("--peak-gbs", type=float, default=3350.0, help="memory peak in GB/s (H100 SXM: 3350, H200: 4800)")
    k.add_argument("--attention-shapes", type=_shape_pair, nargs="+", default=[(1, 32768), (16, 4096), (64, 2048)])
    k.add_argument("--heads", type=positive_int, default=32)
    k.add_argument("--kv-heads", type=positive_int, default=8)
    k.add_argument("--head-dim", type=positive_int, default=128)
    k.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16, 64])
    k.add_argument("--input-len", type=positive_int, default=128)
    k.add_argument("--steps", type=positive_int, default=32, help="decode steps timed per batch size")
    k.add_argument("--iters", type=positive_int, default=20)
    k.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    k.add_argument("--json", default=None)
    k.set_defaults(shape=LLAMA_1B)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                   help="a local HF model directory, served under NAME (default: its directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--quantization", default="none", choices=["none", "bnb-nf4", "bnb-int8"])
    p.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128])
    p.add_argument("--num-blocks", type=positive_int, default=None)
    p.add_argument("--kv-cache-memory", type=float, default=2.0, metavar="GiB")
    p.add_argument("--max-num-seqs", type=positive_int, default=256)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    p.add_argument("--max-queue", type=positive_int, default=None, help="waiting requests beyond this get 429")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    _add_engine_flags(p)


def run_serve(args, parser) -> None:
    import uvicorn

    from counterpoint.serving.async_engine import AsyncEngine
    from counterpoint.serving.config import EngineConfig
    from counterpoint.serving.engine import Engine
    from counterpoint.serving.metrics import Metrics
    from counterpoint.serving.server import build_app

    if args.quantization != "none":
        parser.error(f"--quantization {args.quantization} is not supported yet")
    models = [_model_arg(m) for m in args.model] if args.model else _default_models()
    (name, path), extra = models[0], tuple(models[1:])
    config = EngineConfig(model=path, served_name=name, extra_models=extra, block_size=args.block_size,
                          num_blocks=args.num_blocks, kv_cache_memory_gib=args.kv_cache_memory,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          **engine_kwargs(args))
    try:
        names = [served for served, _ in config.models]  # NOTE: checks the names are unique, before any load
    except ValueError as err:
        parser.error(f"--model: {err}")
    # NOTE: the engine thread and the event loop share the GIL; a short switch interval keeps the
    # engine from waiting out the default 5 ms slice (measured: +8% served tokens/s at 8 clients).
    sys.setswitchinterval(0.0002)
    engine = AsyncEngine(lambda: Engine(config), args.max_queue, Metrics())
    app = build_app(engine, names, args.api_key, args.shutdown_timeout)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=int(args.shutdown_timeout))


def _model_arg(text: str) -> tuple[str, str]:
    from pathlib import Path

    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text).resolve().name
    return name, path


def _default_models() -> list[tuple[str, str]]:
    """The bundled expert, then its amateur for contrastive decoding."""
    from counterpoint.training.defaults import default_models

    models = default_models()
    return [(models.expert.name, str(models.expert)), (models.amateur.name, str(models.amateur))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="counterpoint", description="Counterpoint LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _generate_parser(sub)
    _bench_parser(sub)
    add_train_parser(sub)
    return parser


def run_generate(args, parser) -> None:
    from counterpoint.serving import LLM
    from counterpoint.serving.llm import AMATEUR

    for flag, value in (("--document", args.document), ("--context-contrast", args.context_contrast)):
        if value is not None:
            parser.error(f"{flag} is not supported yet")
    model, amateur = args.model, args.amateur
    if model is None or amateur == "default":
        from counterpoint.training.defaults import default_models

        defaults = default_models()
        model = model or str(defaults.expert)
        amateur = str(defaults.amateur) if amateur == "default" else amateur
    contrastive = {"amateur": AMATEUR, "alpha": args.cd_alpha, "beta": args.cd_beta} if amateur else None
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n,
                                use_beam_search=args.beam_width is not None, best_of=args.beam_width,
                                contrastive=contrastive)
    except ValueError as err:
        parser.error(str(err))
    llm = LLM(model, amateur=amateur, **engine_kwargs(args))
    prompt = args.prompt
    if args.chat:
        prompt = llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    for completion in out.outputs:
        print(completion.text)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            run_serve(args, parser)
        elif args.command == "generate":
            run_generate(args, parser)
        elif args.command == "bench":
            from counterpoint.serving import bench

            if args.bench == "serve":
                from counterpoint.serving.bench_serve import serve_benchmark

                result = serve_benchmark(args)
            elif args.bench in ("beam", "contrastive"):
                from counterpoint.serving import bench_decoding

                result = getattr(bench_decoding, args.bench)(args)
            elif args.bench == "kernels":
                from counterpoint.serving.bench_kernels import kernels

                result = kernels(args)
            else:
                result = bench.throughput(args) if args.bench == "throughput" else bench.latency(args)
            bench.write_json(result, args.json)
        elif args.command == "train":
            run_train(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"counterpoint: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
