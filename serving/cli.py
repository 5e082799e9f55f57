"""The `counterpoint` command line (README.md): serve, generate, bench, eval and train. Every bad flag
value ends in a one-line error naming the flag, under the subcommand's usage, and exit code 2.

Heavy modules (torch, transformers) are imported inside the subcommands, so `--help` and argument
errors answer at once.
"""

import argparse
import sys

from counterpoint.serving.bench.cli import add_bench_parser, run_bench
from counterpoint.serving.eval.cli import add_eval_parser, run_eval
from counterpoint.serving.flags import add_engine_flags, engine_kwargs, non_negative_int, positive_int
from counterpoint.training.cli import add_train_parser, run_train


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate offline and print the completion")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: the bundled model)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=non_negative_int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set reaching P")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below P times the most likely one's")
    p.add_argument("--seed", type=int, default=None, help="seed of this request's sampling")
    p.add_argument("--n", type=positive_int, default=1, help="completions to return")
    p.add_argument("--beam-width", type=positive_int, default=None, help="beam search of this width")
    p.add_argument("--amateur", default=None,
                   help="contrastive decoding against this model directory ('default': the bundled amateur)")
    p.add_argument("--cd-alpha", type=float, default=None,
                   help="contrastive plausibility threshold alpha in (0, 1] (default: SamplingParams')")
    p.add_argument("--cd-beta", type=float, default=None,
                   help="contrastive amateur weight beta >= 0 (default: SamplingParams')")
    p.add_argument("--document", action="append", default=None, metavar="TEXT",
                   help="a retrieved passage, rendered before the prompt (repeat for more)")
    p.add_argument("--context-contrast", choices=["acd", "cad", "adacad"], default=None,
                   help="contrast the prompt with and without the documents (needs --document)")
    p.add_argument("--cc-alpha", type=float, default=0.5, help="CAD's alpha (context-contrast weight)")
    add_engine_flags(p)
    p.set_defaults(run=run_generate, parser=p)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]PATH",
                   help="a local HF model directory, served under NAME (default: its directory name); repeat "
                        "for more models, the first is the default (default: the bundled model and amateur)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=None, help="require this bearer key on every /v1 route")
    p.add_argument("--max-num-seqs", type=positive_int, default=256,
                   help="sequences one step may run, per model (default 256)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="tokens one step may run (default: max(2048, max-num-seqs))")
    p.add_argument("--max-queue", type=positive_int, default=None, help="waiting requests beyond this get 429")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    add_engine_flags(p)
    p.set_defaults(run=run_serve, parser=p)


def run_serve(args) -> None:
    from counterpoint.serving.engine.config import EngineConfig
    from counterpoint.serving.serve import serve

    models = [_model_arg(m) for m in args.model] if args.model else _default_models(args.quantization)
    (name, path), extra = models[0], tuple(models[1:])
    config = EngineConfig(model=path, served_name=name, extra_models=extra, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, **engine_kwargs(args))
    try:
        config.models  # NOTE: checks the names are unique, before any load
    except ValueError as err:
        args.parser.error(f"--model: {err}")
    sys.exit(serve(config, args.host, args.port, args.api_key, args.max_queue, args.shutdown_timeout))


def _model_arg(text: str) -> tuple[str, str]:
    from counterpoint.serving.engine.config import default_name

    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = default_name(text)
    return name, path


def _default_models(quantization: str) -> list[tuple[str, str]]:
    """The bundled expert (from its GGUF file with --quantization gguf), then its amateur."""
    from counterpoint.training.defaults import bundled_gguf, default_models

    models = default_models()
    expert = bundled_gguf() if quantization == "gguf" else models.expert
    return [(models.expert.name, str(expert)), (models.amateur.name, str(models.amateur))]


def run_generate(args) -> None:
    from counterpoint.decoding import SamplingParams
    from counterpoint.serving.llm import AMATEUR, LLM

    model, amateur = args.model, args.amateur
    if model is None or amateur == "default":
        from counterpoint.training.defaults import bundled_gguf, default_models

        defaults = default_models()
        model = model or str(bundled_gguf() if args.quantization == "gguf" else defaults.expert)
        amateur = str(defaults.amateur) if amateur == "default" else amateur
    contrastive = None
    if amateur:
        given = {"alpha": args.cd_alpha, "beta": args.cd_beta}
        contrastive = {"amateur": AMATEUR, **{k: v for k, v in given.items() if v is not None}}
    context = {"method": args.context_contrast, "alpha": args.cc_alpha} if args.context_contrast else None
    if context and not args.document:
        args.parser.error("--context-contrast needs at least one --document")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n,
                                use_beam_search=args.beam_width is not None, best_of=args.beam_width,
                                contrastive=contrastive, context_contrast=context)
    except ValueError as err:
        args.parser.error(str(err))
    llm = LLM(model, amateur=amateur, **engine_kwargs(args))
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, documents=args.document, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, documents=args.document, use_tqdm=False)[0]
    for completion in out.outputs:
        print(completion.text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="counterpoint", description="Counterpoint LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _generate_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded beside published results
    try:
        if args.command == "bench":
            run_bench(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "train":
            run_train(args)
        else:
            args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"counterpoint: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
