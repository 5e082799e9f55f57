"""Attention over the paged KV cache: the backend interface, the torch (CPU) and Triton (GPU)
backends, and CUDA graphs of the decode step."""

from counterpoint.serving.attention import invariant_backend, torch_backend  # noqa: F401  (register themselves)
from counterpoint.serving.attention.base import BACKENDS, AttentionBackend


def create_backend(name: str, scale: float) -> AttentionBackend:
    if name == "triton" and name not in BACKENDS:
        from counterpoint.serving.attention import triton_backend  # noqa: F401  (registers itself; needs triton)
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return BACKENDS[name](scale)
