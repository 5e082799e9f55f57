"""A bfloat16 linear layer for a few rows on the CPU in one C call (cpu_gemv.c, built by
serving/native.py), where the CPU has AVX-512 BF16 dot products or, failing those, AVX2 and FMA.

A decode step multiplies a few rows by every weight once, so it is bound by reading the weights.
With AVX-512 BF16 oneDNN's linear reads them at about 25-30 GB/s and the C loop at 35-45; from
about 128 rows the multiplications dominate and oneDNN's GEMM is as fast. With AVX2 alone, oneDNN
would emulate bfloat16, so `PackedLinear` multiplies a float32 copy there, which is twice the
bytes to read; the C loop reads the bfloat16 weight and widens it in registers: 1.4-2.4x faster
up to 16 rows, even from about 32 (`counterpoint bench kernels --device cpu`, "linear").
Where the CPU also has AMX tiles (cpu_amx.h), from 6 rows the loop multiplies on them instead:
on a 2-core Xeon VM a step's linear layers at 32 rows took 19 ms against 59 ms with VDPBF16PS.
"""

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from counterpoint.serving import native

SOURCE = Path(__file__).with_name("cpu_gemv.c")
AVX2, AVX512_BF16, AMX = 1, 2, 3  # what the built library reports
# NOTE: AVX-512 BF16: against oneDNN's packed GEMM 1.1-1.5x up to 64 rows, even at 96-128, 0.9x at 256, where
# F.linear's unpacked oneDNN GEMM is within 3% of it (SmolLM2's layers, Zen 5)
# AVX2: 1.06x at 32 rows, 0.96x at 64 (Zen 2)
# AMX (tiles from 6 rows): against F.linear's unpacked GEMM 1.4x at 32 rows, even at 64, 0.8-0.95x at 128 (Xeon VM)
MAX_ROWS = {AMX: 64, AVX512_BF16: 192, AVX2: 32}
PAIRS, TILE = 32, 4  # the C loop's step along a row, and its block of weight rows


@functools.cache
def available() -> int:
    """The instruction set the C loop was built for (AMX, AVX512_BF16 or AVX2), 0 where it cannot run."""
    lib = native.load(SOURCE)
    return 0 if lib is None else lib.available()


def max_rows() -> int:
    """The most rows the C loop takes; 0 where it cannot run."""
    return MAX_ROWS.get(available(), 0)


def supports(linear: nn.Linear) -> bool:
    """A CPU bfloat16 layer without bias, in_features a multiple of 32, out_features of 4."""
    w = linear.weight
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and linear.bias is None and w.dim() == 2
            and w.shape[1] % PAIRS == 0 and w.shape[0] % TILE == 0 and bool(available()))


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
