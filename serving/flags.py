"""Command-line flags that several commands share (serve, generate and the engine benchmarks):
argument types, and the engine flags with their translation to EngineConfig fields."""

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: the Triton kernels on CUDA, the torch path on the CPU; torch forces the torch path")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: run every decode step eagerly (graphs are used on CUDA with triton)")


def engine_kwargs(args) -> dict:
    """The flags of add_engine_flags as EngineConfig fields."""
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
