"""RMSNorm with the residual add on the CPU in one C call (cpu_norm.c, built by serving/native.py).

At one decoding sequence the norm's five torch ops (add, cast, normalise, cast, scale) cost more
than their arithmetic; the layer calls the norm twice.
"""

import ctypes
import functools
from pathlib import Path

import torch

from counterpoint.serving import native
from counterpoint.serving.native import ELEM_SIZE, LANES

SOURCE = Path(__file__).with_name("cpu_norm.c")


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU (rows, dim) input with dim a multiple of 16, in float32 or bfloat16 like its weight, and
    no gradient wanted (the C call is invisible to autograd)."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype in ELEM_SIZE and weight.dtype == x.dtype
            and x.shape[1] % LANES == 0 and not torch.is_grad_enabled() and native.load(SOURCE) is not None)


@functools.cache
def _add_rms_norm():
    # NOTE: declared argument types let ctypes take plain numbers: the model calls this twice a layer
    fn = native.load(SOURCE).add_rms_norm
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64]
    fn.restype = None
    return fn


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """norm(x) or, with `residual`, (norm(x + residual), x + residual), as `RMSNorm` computes them."""
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    total = None if residual is None else torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    _add_rms_norm()(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                    out.data_ptr(), None if total is None else total.data_ptr(), x.shape[0], x.shape[1], eps,
                    ELEM_SIZE[x.dtype])
    return out if residual is None else (out, total)
