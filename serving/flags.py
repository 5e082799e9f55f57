"""Command-line flags that several commands share (serve, generate and the engine benchmarks):
argument types, and the engine flags with their translation to EngineConfig fields."""

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: the checkpoint's; float16 runs as float32 on the CPU)")
    p.add_argument("--quantization", default="none", choices=["none", "gguf", "bnb-nf4", "bnb-int8"],
                   help="gguf: serve the bundled model from its 4-bit GGUF file (any .gguf --model is served as "
                        "stored anyway); bnb-nf4 / bnb-int8: quantize float checkpoints with bitsandbytes as they "
                        "load (GPTQ and bitsandbytes checkpoints are recognised from their config)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length, prompt and output together (default: the model's)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: the Triton kernels on CUDA, the torch path on the CPU; torch forces the torch path")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: run every decode step eagerly (graphs are used on CUDA with triton)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens never depend on what else is in its batch, how its prompt was "
                        "chunked or what the prefix cache held (slower: one row and one token at a time)")
    p.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128], help="tokens per KV block")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--num-blocks", type=positive_int, default=None, help="KV blocks per model (overrides the size)")
    cache.add_argument("--kv-cache-memory", type=positive_float, default=None, metavar="GiB",
                       help="KV cache size per model (default: what max-num-seqs x max-model-len can use, at most "
                            "5%% of the machine's memory on the CPU, 2 GiB on CUDA)")


def engine_kwargs(args) -> dict:
    """The flags of add_engine_flags as EngineConfig fields."""
    return dict(dtype=args.dtype, quantization=args.quantization, device=args.device, max_model_len=args.max_model_len,
                attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                batch_invariant=args.batch_invariant,
                block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_memory_gib=args.kv_cache_memory)
