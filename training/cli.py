"""`counterpoint train ...`: the training module's subcommands."""

import argparse


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="build the checkpoints the server serves").add_subparsers(
        dest="train", required=True)
    imp = train.add_parser("import-gguf", help="a GGUF file to a Hugging Face directory")
    imp.add_argument("file", help="the .gguf file")
    imp.add_argument("out", help="output directory")
    imp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    merge = train.add_parser("merge", help="merge models from a mergekit-style YAML config")
    merge.add_argument("config", help="YAML file: merge_method, slices, dtype")
    merge.add_argument("out", help="output directory")
    train.add_parser("defaults", help="build the bundled default expert and amateur into the cache; print paths")


def run_train(args: argparse.Namespace) -> None:
    if args.train == "import-gguf":
        from counterpoint.training.gguf_import import import_gguf

        print(import_gguf(args.file, args.out, args.dtype))
    elif args.train == "merge":
        from counterpoint.training.merge import MergeConfig, run_merge

        print(run_merge(MergeConfig.from_yaml(args.config), args.out))
    elif args.train == "defaults":
        from counterpoint.training.defaults import default_models

        models = default_models()
        print(f"expert: {models.expert}\namateur: {models.amateur}")
