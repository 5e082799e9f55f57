"""`counterpoint eval rag` and `counterpoint eval decoding`: offline on a local model (the bundled
one by default) or, with --base-url, against any OpenAI-compatible server."""

import json

from counterpoint.serving.flags import add_engine_flags, engine_kwargs, positive_int


def add_eval_parser(sub) -> None:
    evals = sub.add_parser("eval", help="output quality of decoding methods on the bundled evaluation sets")
    kinds = evals.add_subparsers(dest="eval", required=True)
    rag = kinds.add_parser("rag", help="exact match of no-RAG, RAG, CAD, ACD and AdaCAD with gold, irrelevant "
                                       "and conflicting passages, split by what the model knows")
    rag.add_argument("--questions", default=None,
                     help="a JSON Lines file in the factual schema (default: the bundled factual questions)")
    rag.add_argument("--max-tokens", type=positive_int, default=24, help="tokens per answer (default 24)")
    dec = kinds.add_parser("decoding", help="diversity, coherence, factual exact match and arithmetic accuracy of "
                                            "decoding configurations")
    dec.add_argument("--config", action="append", default=None, metavar="NAME=JSON",
                     help="a configuration: request body fields, e.g. 'cd={\"temperature\": 0, \"contrastive\": "
                          "{\"amateur\": \"smollm2-amateur\"}}' (repeat; default: the README's table)")
    dec.add_argument("--sets", nargs="+", choices=["open_ended", "factual", "arithmetic"],
                     default=["open_ended", "factual", "arithmetic"], help="evaluation sets to run")
    dec.add_argument("--amateur", action="append", default=None, metavar="NAME=DIR",
                     help="offline: load this amateur under NAME for the configurations' \"contrastive\" "
                          "(repeat; without --config, the default table contrasts against these instead of the "
                          "bundled amateurs)")
    dec.add_argument("--scorer", default=None,
                     help="model directory whose log-likelihood measures coherence (default: the evaluated model "
                          "offline, the bundled model with --base-url)")
    for p in (rag, dec):
        p.add_argument("--model", default=None, help="local model directory (default: the bundled model)")
        p.add_argument("--base-url", default=None, help="evaluate this OpenAI-compatible server instead, e.g. "
                                                        "http://127.0.0.1:8000/v1")
        p.add_argument("--served-model", default=None, help="the model name to ask the server for (default: its "
                                                            "first model)")
        p.add_argument("--api-key", default=None, help="the server's API key")
        p.add_argument("--concurrency", type=positive_int, default=16, help="requests in flight with --base-url")
        p.add_argument("--format", choices=["auto", "chat", "qa"], default="auto",
                       help="chat messages, or 'Question: ...\\nAnswer:' completions (auto: chat when the model "
                            "has a chat template; always chat with --base-url)")
        p.add_argument("--limit", type=positive_int, default=None,
                       help="only N items of each set, spread evenly over it (every category)")
        p.add_argument("--json", default=None, help="write the table, settings and every output here")
        p.add_argument("--plot", default=None, help="draw the table as bars into this PNG file")
        add_engine_flags(p)
        p.set_defaults(parser=p)


def run_eval(args) -> None:
    from counterpoint.serving.eval.report import provenance, write_json

    result = _run_rag(args) if args.eval == "rag" else _run_decoding(args)
    write_json({**provenance(args.argv), **result}, args.json)


def _run_rag(args) -> dict:
    from counterpoint.serving.eval.datasets import PASSAGE_KINDS, load, load_file, spread
    from counterpoint.serving.eval.rag import evaluate_rag
    from counterpoint.serving.eval.report import format_table, plot_bars

    items = spread(load_file(args.questions) if args.questions else load("factual"), args.limit)
    result = evaluate_rag(_backend(args, {}), items, args.max_tokens)
    table = result.table()
    columns = [f"{split}/{kind}" for split in ("known", "unknown") for kind in (*PASSAGE_KINDS, "kept-own")]
    ems = {method: {c: cells[c]["em"] for c in columns} for method, cells in table.items()}
    print(f"\nknown (answered right with no passage): {sum(result.known)} of {len(items)}; exact match, %; "
          "target: the true answer, or the conflicting passage's answer; kept-own: the true answer "
          "despite a conflicting passage\n")
    print(format_table(ems, columns))
    if args.plot:
        plot_bars({m: v for m, v in ems.items() if m != "no-rag"}, [c for c in columns if "kept" not in c],
                  "exact match by passage, split by what the model knows", "exact match (%)", args.plot)
    return {"eval": "rag", "num_items": len(items), "num_known": sum(result.known), "table": table,
            "items": [{"id": item.get("id"), "known": known, **{f"{m}/{k}": result.outputs[m][k][i]
                                                                  for m in result.outputs for k in PASSAGE_KINDS}}
                      for i, (item, known) in enumerate(zip(items, result.known))]}


def _run_decoding(args) -> dict:
    from counterpoint.serving.eval.quality import COLUMNS, Scorer, default_configs, evaluate_decoding
    from counterpoint.serving.eval.report import format_table, plot_bars

    configs = _configs(args)
    amateurs = _amateurs(args) if configs or args.base_url or args.amateur else _default_amateurs()
    configs = configs or default_configs({label: name for label, (name, _) in amateurs.items()})
    backend = _backend(args, dict(amateurs.values()))
    scorer = None
    if "open_ended" in args.sets:
        scorer = Scorer(args.scorer or _default_model(args), backend.chat)
    table, outputs = evaluate_decoding(backend, configs, tuple(args.sets), args.limit, scorer)
    columns = [c for c in COLUMNS if any(c in row for row in table.values())]
    print("\n" + format_table(table, columns, digits=2))
    if args.plot:
        plot_bars({k: {c: v.get(c) for c in columns if c not in ("coherence", "length")} for k, v in table.items()},
                  [c for c in columns if c not in ("coherence", "length")], "decoding configurations", "%", args.plot)
    return {"eval": "decoding", "configs": configs, "table": table, "outputs": outputs}


def _default_amateurs() -> dict[str, tuple[str, str]]:
    """label -> (served name, directory) of each bundled amateur that exists."""
    from counterpoint.training.defaults import default_models

    models = default_models()
    found = {"default amateur": models.amateur, "first-4 slice": models.instant_amateur,
             "distilled": models.distilled_amateur}
    seen, out = set(), {}
    for label, path in found.items():
        if path is not None and path not in seen:
            seen.add(path)
            out[label] = (path.name, str(path))
    return out


def _amateurs(args) -> dict[str, tuple[str, str]]:
    """--amateur NAME=DIR as label -> (served name, directory)."""
    out = {}
    for text in args.amateur or []:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            args.parser.error(f"--amateur must be NAME=DIR; got {text!r}")
        out[name] = (name, path)
    return out


def _default_model(args) -> str:
    if args.model and not args.base_url:
        return args.model
    from counterpoint.training.defaults import default_models

    return str(default_models().expert)


def _configs(args) -> dict[str, dict] | None:
    if not args.config:
        return None
    configs = {}
    for text in args.config:
        name, sep, body = text.partition("=")
        try:
            configs[name] = json.loads(body) if sep else None
        except json.JSONDecodeError as err:
            args.parser.error(f"--config {name}: not JSON ({err.msg})")
        if not isinstance(configs[name], dict):
            args.parser.error(f"--config must be NAME=JSON object; got {text!r}")
    return configs


def _backend(args, amateurs: dict[str, str]):
    """The HTTP backend with --base-url; else the engine with the model and the named amateurs."""
    from counterpoint.serving.eval.backends import HttpBackend, OfflineBackend

    if args.base_url:
        return HttpBackend(args.base_url, args.served_model, args.api_key, args.concurrency, args.format != "qa")
    from pathlib import Path

    model = _default_model(args)
    models = [(Path(model).resolve().name, model), *amateurs.items()]
    return OfflineBackend(models, None if args.format == "auto" else args.format == "chat", **engine_kwargs(args))
