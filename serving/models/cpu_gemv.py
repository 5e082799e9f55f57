"""A bfloat16 linear layer for up to 192 rows on the CPU in one C call (cpu_gemv.c, built by
serving/native.py), where the CPU has AVX-512 BF16 dot products.

A decode step multiplies a few rows by every weight once. oneDNN's linear reads the weights at
about 25-30 GB/s there; the C loop, which prefetches the next rows of the weight, at 35-45
(`counterpoint bench kernels --device cpu`, "linear"). From about 128 rows the multiplications
dominate and oneDNN's GEMM is as fast; `PackedLinear` hands larger batches to F.linear.
"""

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from counterpoint.serving import native

SOURCE = Path(__file__).with_name("cpu_gemv.c")
MAX_ROWS = 192  # NOTE: against oneDNN's packed GEMM 1.1-1.5x up to 64 rows, even at 96-128, 0.9x at 256, where
# F.linear's unpacked oneDNN GEMM is within 3% of it (SmolLM2's layers, Zen 5)
PAIRS, TILE = 32, 4  # the C loop's step along a row, and its block of weight rows


@functools.cache
def available() -> bool:
    lib = native.load(SOURCE)
    return lib is not None and bool(lib.available())


def supports(linear: nn.Linear) -> bool:
    """A CPU bfloat16 layer without bias, in_features a multiple of 32, out_features of 4."""
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and linear.bias is None and w.dim() == 2
            and w.shape[1] % PAIRS == 0 and w.shape[0] % TILE == 0 and available())


@functools.cache
def _linear_bf16():
    # NOTE: declared argument types let ctypes take plain ints: a decode step makes hundreds of these calls
    fn = native.load(SOURCE).linear_bf16
    fn.argtypes, fn.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4, None
    return fn


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) bfloat16 · weight (out, in)^T -> (..., out), as F.linear (inference only)."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_features, in_features = weight.shape
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    _linear_bf16()(weight.data_ptr(), rows.data_ptr(), out.data_ptr(), rows.shape[0], out_features, in_features,
                   rows.stride(0))
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)
