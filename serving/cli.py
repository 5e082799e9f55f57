"""The `counterpoint` command line (API.md): serve, generate, bench and train. Every bad flag
value ends in a one-line error and exit code 2."""

import argparse
import sys

from counterpoint.serving.bench.cli import add_bench_parser, run_bench
from counterpoint.serving.flags import add_engine_flags, engine_kwargs, positive_int
from counterpoint.training.cli import add_train_parser, run_train


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
    add_engine_flags(p)


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
    add_engine_flags(p)


def run_serve(args, parser) -> None:
    import uvicorn

    from counterpoint.serving.api.async_engine import AsyncEngine
    from counterpoint.serving.api.metrics import Metrics
    from counterpoint.serving.api.server import build_app
    from counterpoint.serving.engine.config import EngineConfig
    from counterpoint.serving.engine.engine import Engine

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
    add_bench_parser(sub)
    add_train_parser(sub)
    return parser


def run_generate(args, parser) -> None:
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving.llm import AMATEUR, LLM

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
            run_bench(args)
        elif args.command == "train":
            run_train(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"counterpoint: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
