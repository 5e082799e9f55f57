"""Engine configuration: one frozen dataclass, validated with messages that name the field."""

from dataclasses import dataclass
from pathlib import Path

import torch

QUANTIZATIONS = ("none", "gguf", "bnb-nf4", "bnb-int8")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    served_name: str | None = None  # default: the model directory's name
    extra_models: tuple[tuple[str, str], ...] = ()  # (served name, path): amateurs and other models
    dtype: str = "auto"
    quantization: str = "none"  # gguf: .gguf files as stored; bnb-nf4 / bnb-int8: quantize float checkpoints
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float | None = None  # None: auto (model_slot.kv_cache_budget)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs: every decode step runs eagerly
    batch_invariant: bool = False  # a request's tokens never depend on its batch, chunking or cache hits
    cuda_graph_max_batch_size: int = 256  # larger decode batches run eagerly
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self):
        checks = [
            ("block_size", self.block_size in (8, 16, 32, 64, 128), "one of 8, 16, 32, 64, 128"),
            ("num_blocks", self.num_blocks is None or self.num_blocks > 0, "a positive integer"),
            ("kv_cache_memory_gib", self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "> 0"),
            ("max_num_seqs", self.max_num_seqs > 0, "a positive integer"),
            ("max_num_batched_tokens", self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
             "a positive integer"),
            ("max_model_len", self.max_model_len is None or self.max_model_len > 1, "an integer > 1"),
            ("device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("dtype", self.dtype in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"),
            ("quantization", self.quantization in QUANTIZATIONS, "one of " + ", ".join(QUANTIZATIONS)),
            ("cuda_graph_max_batch_size", self.cuda_graph_max_batch_size > 0, "a positive integer"),
            ("attention_backend", self.attention_backend in ("auto", "torch", "triton"), "auto, torch or triton"),
        ]
        checks.append(("attention_backend", not (self.batch_invariant and self.attention_backend == "triton"),
                       "auto or torch with batch_invariant (the Triton kernels' splits follow the batch)"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}; got {getattr(self, name)!r}")

    @property
    def models(self) -> list[tuple[str, str]]:
        """(served name, path) of every model, the default one first."""
        models = [(self.served_name or default_name(self.model), str(self.model))] + list(self.extra_models)
        names = [name for name, _ in models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"model names must be unique; {duplicated[0]!r} is given twice")
        return models

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        return torch.device(self.device)

    @property
    def resolved_attention_backend(self) -> str:
        """auto: the Triton kernels on CUDA, the torch path on the CPU."""
        if self.batch_invariant:
            return "torch_invariant"
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.torch_device.type == "cuda" else "torch"

    @property
    def uses_cuda_graphs(self) -> bool:
        """Decode steps replay CUDA graphs: on CUDA, with the Triton kernels, unless enforce_eager."""
        return (not self.enforce_eager and self.torch_device.type == "cuda"
                and self.resolved_attention_backend == "triton")

    @property
    def num_batched_tokens(self) -> int:
        return self.max_num_batched_tokens or max(2048, self.max_num_seqs)


def default_name(path: str | Path) -> str:
    """A model's served name when none is given: its directory's name, or a GGUF file's stem."""
    path = Path(path).resolve()
    return path.stem if path.suffix == ".gguf" else path.name
