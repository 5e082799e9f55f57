"""`counterpoint train ...`: the training module's subcommands."""

import argparse

from counterpoint.training.presets import PRESETS


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="build the checkpoints the server serves").add_subparsers(
        dest="train", required=True)
    imp = train.add_parser("import-gguf", help="a GGUF file to a Hugging Face directory")
    imp.add_argument("file", help="the .gguf file")
    imp.add_argument("out", help="output directory")
    imp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                     help="dtype of the written weights")
    merge = train.add_parser("merge", help="merge models from a mergekit-style YAML config")
    merge.add_argument("config", help="mergekit YAML: merge_method, models / base_model / parameters or slices, "
                                      "dtype, out_dtype, tokenizer_source, seed")
    merge.add_argument("out", help="output directory")
    defaults = train.add_parser("defaults", help="build the bundled default expert and amateur into the cache; "
                                                 "print paths")
    defaults.add_argument("--distill", action="store_true",
                          help="also distil the ~17M-parameter default amateur from the expert (resumable)")
    defaults.add_argument("--steps", type=int, default=None, help="distillation steps (default 300)")
    _amateur_parser(train)
    _pretrain_parser(train)
    _distill_parser(train)
    _world_parser(train)
    _quantize_parser(train)
    _surgery_parsers(train)
    ppl = train.add_parser("perplexity", help="held-out perplexity of models on the same text")
    ppl.add_argument("models", nargs="+")
    ppl.add_argument("--files", nargs="*", default=[], help="text files (default: the standard library's .py files)")
    ppl.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    ppl.add_argument("--max-rows", type=int, default=64, help="rows of held-out text scored")


def _amateur_parser(train) -> None:
    p = train.add_parser("amateur", help="a contrastive-decoding amateur for a chat model, from its own greedy "
                                         "replies: a repetition anti-expert (the default amateur's recipe) or an "
                                         "early exit with a fitted head")
    p.add_argument("expert", help="the chat model (Hugging Face directory with a chat template)")
    p.add_argument("out", help="output directory")
    p.add_argument("--kind", default="anti-expert", choices=["anti-expert", "early-exit"],
                   help="anti-expert: the last layers fine-tuned to repeat more; early-exit: the first layers")
    p.add_argument("--layers", type=int, default=None,
                   help="layers trained (anti-expert, default 6) or kept (early-exit, default 4)")


def _quantize_parser(train) -> None:
    p = train.add_parser("quantize", help="GPTQ or round-to-nearest quantization into the gptq (v1) layout, or a "
                                          "pre-quantized bitsandbytes checkpoint")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn", "bnb-nf4", "bnb-int8"],
                   help="gptq, round-to-nearest, or a bitsandbytes checkpoint")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="bits per weight (gptq, rtn)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1: one per row")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order: columns by decreasing Hessian diagonal")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero point in the middle)")
    p.add_argument("--files", nargs="*", default=[],
                   help="calibration text files (default: the standard library's .py files)")
    p.add_argument("--calibration-rows", type=int, default=64, help="rows of calibration text")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out rows for the perplexity before and after")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")


def _surgery_parsers(train) -> None:
    cv = train.add_parser("chat-vector", help="θ_cpt + r·(θ_chat − θ_base): instruction following back after "
                                              "continued pre-training")
    cv.add_argument("--cpt", required=True, help="the continued-pre-training model")
    cv.add_argument("--chat", required=True, help="the chat (instruction-tuned) model")
    cv.add_argument("--base", required=True, help="the base model the chat model was tuned from")
    cv.add_argument("out", help="output directory")
    cv.add_argument("--ratio", type=float, default=1.0, help="r, the share of the chat residual added")
    cv.add_argument("--skip-embed", action="store_true", help="keep the CPT model's embedding and lm_head rows")
    up = train.add_parser("upscale", help="depth up-scaling (SOLAR): layers [0, n-m) then [m, n) of one model")
    up.add_argument("model", help="Hugging Face model directory")
    up.add_argument("out", help="output directory")
    up.add_argument("--overlap", type=int, required=True, help="m, the layers each copy drops")
    up.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights")
    ex = train.add_parser("expand", help="block expansion (LLaMA Pro): a zeroed copy after every k-th block; "
                                         "--train trains only the new blocks")
    ex.add_argument("model", help="Hugging Face model directory")
    ex.add_argument("out", help="output directory")
    ex.add_argument("--every", type=int, default=4, help="k: a new block after every k-th")
    ex.add_argument("--train", dest="train_blocks", action="store_true",
                    help="then train the new blocks on --files (the rest frozen)")
    _add_loop_flags(ex, steps=100)
    ex.set_defaults(lr=1e-4)
    lo = train.add_parser("lora", help="LoRA adapters with peft on text or chat JSONL (loss on assistant turns); "
                                       "--merge folds them in; counts intruder dimensions")
    lo.add_argument("model", help="Hugging Face model directory")
    lo.add_argument("out", help="output directory: the adapter (peft layout); with --merge also OUT/merged")
    lo.add_argument("--chat-data", default=None, help='JSONL of {"messages": [...]} (instead of --files)')
    lo.add_argument("--rank", type=int, default=8, help="r")
    lo.add_argument("--alpha", type=float, default=16.0, help="α: the update is scaled by α/r")
    lo.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    lo.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], help="linear layers adapted")
    lo.add_argument("--merge", action="store_true", help="also write the model with W + (α/r)·B·A to OUT/merged")
    lo.add_argument("--full", action="store_true", help="a full fine-tune instead (same data and steps), to compare")
    _add_loop_flags(lo, steps=100)
    lo.set_defaults(lr=2e-4)


def _add_loop_flags(p, steps: int) -> None:
    p.add_argument("--files", nargs="*", default=[], help="text files (default: the standard library's .py files)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")
    p.add_argument("--batch-size", type=int, default=16, help="rows per step")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps before the cosine decay")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation runs")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--max-corpus-bytes", type=int, default=4_000_000, help="read at most this much text")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)


LOOP_FIELDS = ("seq_len", "batch_size", "steps", "lr", "warmup", "eval_every", "save_every", "max_corpus_bytes",
               "seed", "resume", "stop_at")


def _distill_parser(train) -> None:
    p = train.add_parser("distill", help="train a student from a teacher with the same vocabulary")
    p.add_argument("teacher", help="teacher HF directory")
    p.add_argument("out", help="output directory (also holds checkpoint.pt for --resume)")
    p.add_argument("--config", dest="preset", default="tiny", choices=sorted(PRESETS), help="student size preset")
    p.add_argument("--init-layers", type=int, default=None, help="start from the teacher's first K layers instead")
    p.add_argument("--w-ce", type=float, default=0.5, help="weight of the cross-entropy on the data")
    p.add_argument("--w-kl", type=float, default=0.5, help="weight of the KL to the teacher")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--w-hidden", type=float, default=0.0,
                   help="hidden-state MSE through a projection (dropped on save)")
    _add_loop_flags(p, steps=300)


def _pretrain_parser(train) -> None:
    p = train.add_parser("pretrain", help="train a BPE tokenizer and a Llama model from text files")
    p.add_argument("out", help="output directory (also holds checkpoint.pt for --resume)")
    p.add_argument("--config", dest="preset", default="tiny", choices=sorted(PRESETS), help="size preset")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    _add_loop_flags(p, steps=300)


def _world_parser(train) -> None:
    p = train.add_parser("world", help="the synthetic world for context contrast: its questions and a model "
                                       "trained on part of it")
    p.add_argument("out", help="output directory: the model, world.jsonl and the training text")
    p.add_argument("--entities", dest="num_entities", nargs=3, type=int, default=[25, 25, 8000],
                   metavar=("KNOWN", "HELD_OUT", "READING"),
                   help="countries learned by heart, held out for evaluation, and only read from passages")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of the training")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")


def run_train(args: argparse.Namespace) -> None:
    if args.train == "import-gguf":
        from counterpoint.training.gguf_import import import_gguf

        print(import_gguf(args.file, args.out, args.dtype))
    elif args.train == "merge":
        from counterpoint.training.merge import MergeConfig, run_merge

        print(run_merge(MergeConfig.from_yaml(args.config), args.out))
    elif args.train == "pretrain":
        from pathlib import Path

        from counterpoint.training.pretrain import PretrainConfig, pretrain

        fields = ("preset", "vocab_size") + LOOP_FIELDS
        metrics = pretrain(PretrainConfig(out=Path(args.out), files=[Path(f) for f in args.files],
                                          **{k: getattr(args, k) for k in fields}))
        print(f"val loss {metrics['initial_val_loss']:.3f} -> {metrics['val_loss']:.3f} "
              f"(perplexity {metrics['val_perplexity']:.1f}) after {metrics['steps']} steps")
    elif args.train == "distill":
        from pathlib import Path

        from counterpoint.training.distill import DistillConfig, distill

        fields = ("preset", "init_layers", "w_ce", "w_kl", "temperature", "w_hidden") + LOOP_FIELDS
        metrics = distill(DistillConfig(teacher=Path(args.teacher), out=Path(args.out),
                                        files=[Path(f) for f in args.files], **{k: getattr(args, k) for k in fields}))
        print(f"KL to the teacher {metrics['val_kl_before']:.3f} -> {metrics['val_kl']:.3f}; "
              f"validation perplexity {metrics['val_perplexity']:.1f} after {metrics['steps']} steps")
    elif args.train == "world":
        from pathlib import Path

        import torch

        from counterpoint.training.world_train import WorldConfig, summary, train_world

        if args.threads:
            torch.set_num_threads(args.threads)
        known, held_out, reading = args.num_entities
        metrics = train_world(WorldConfig(out=Path(args.out), seed=args.seed, steps=args.steps, num_known=known,
                                          num_held_out=held_out, num_reading=reading))
        print(summary(metrics))
    elif args.train == "quantize":
        from pathlib import Path

        from counterpoint.training.quantize import QuantizeConfig, quantize

        fields = ("method", "bits", "group_size", "desc_act", "sym", "calibration_rows", "seq_len", "eval_rows",
                  "seed")
        metrics = quantize(QuantizeConfig(model=Path(args.model), out=Path(args.out),
                                          files=[Path(f) for f in args.files], **{k: getattr(args, k) for k in fields}))
        print(f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity_after']:.2f}: {args.out}")
    elif args.train == "chat-vector":
        from pathlib import Path

        from counterpoint.training.chat_vector import chat_vector

        print(chat_vector(Path(args.cpt), Path(args.chat), Path(args.base), Path(args.out), args.ratio,
                          args.skip_embed))
    elif args.train == "upscale":
        from pathlib import Path

        from counterpoint.training.upscale import upscale

        print(upscale(Path(args.model), Path(args.out), args.overlap, args.dtype))
    elif args.train == "expand":
        from pathlib import Path

        from counterpoint.training.expand import ExpandConfig, expand

        loop = {k: getattr(args, k) for k in LOOP_FIELDS}
        metrics = expand(ExpandConfig(model=Path(args.model), out=Path(args.out), every=args.every,
                                      train=args.train_blocks, files=[Path(f) for f in args.files], **loop))
        print(f"new blocks at {metrics['new_layers']}: {args.out}")
    elif args.train == "lora":
        from pathlib import Path

        from counterpoint.training.lora import LoraTrainConfig, train_lora

        metrics = train_lora(LoraTrainConfig(
            model=Path(args.model), out=Path(args.out), files=[Path(f) for f in args.files], rank=args.rank,
            alpha=args.alpha, dropout=args.dropout, target_modules=tuple(args.target_modules), merge=args.merge,
            full=args.full, chat_data=Path(args.chat_data) if args.chat_data else None,
            **{k: getattr(args, k) for k in LOOP_FIELDS}))
        print(f"val loss {metrics['val_loss_before']:.3f} -> {metrics['val_loss']:.3f}; "
              f"{metrics['intruder_dimensions']} intruder dimensions in {metrics['matrices']} matrices: {args.out}")
    elif args.train == "perplexity":
        from pathlib import Path

        from counterpoint.training.perplexity import compare

        for model, value in compare([Path(m) for m in args.models], [Path(f) for f in args.files], args.seq_len,
                                    args.max_rows).items():
            print(f"{value:10.2f}  {model}")
    elif args.train == "amateur":
        from dataclasses import replace
        from pathlib import Path

        from counterpoint.training.defaults import (AmateurRecipe, AntiExpertRecipe, build_anti_expert,
                                                    build_early_exit_amateur)

        expert, out = Path(args.expert), Path(args.out)
        if args.kind == "anti-expert":
            recipe = AntiExpertRecipe()
            recipe = replace(recipe, trained_layers=args.layers) if args.layers else recipe
            metrics = build_anti_expert(expert, out, recipe)
            print(f"repeated spans' log-probability {metrics['val_span_logprob_expert']:.3f} (expert) -> "
                  f"{metrics['span_logprob']:.3f}; KL to the expert elsewhere {metrics['kl_elsewhere']:.4f}: {out}")
        else:
            recipe = AmateurRecipe()
            metrics = build_early_exit_amateur(expert, out, replace(recipe, num_layers=args.layers) if args.layers
                                               else recipe)
            print(f"held-out perplexity {metrics['val_perplexity_slice']:.3g} (slice) -> "
                  f"{metrics['val_perplexity_fitted']:.1f}: {out}")
    elif args.train == "defaults":
        from counterpoint.training.defaults import DISTILL_STEPS, build_distilled_amateur, default_models

        if args.distill:
            build_distilled_amateur(args.steps or DISTILL_STEPS)
        models = default_models()
        print(f"expert: {models.expert}\namateur: {models.amateur}")
