"""Contrastive decoding's combination on the CPU in one C call (cpu_contrastive.c, built by
serving/native.py), registered as the fused CPU path of decoding/combine/contrastive.py.

The torch code makes some ten passes over (rows, vocab) float32 temporaries, and on the CPU each
fresh full-size temporary also costs new pages: for 16 rows of a 49K vocabulary it took 5-9 ms of
a 45-60 ms contrastive step on a 2-core Xeon. The C loop reads the bfloat16 logits as they come
from the lm_head, keeps each row in cache and writes the result once.
"""

import ctypes
import functools
from pathlib import Path

import torch

from counterpoint.serving import native
from counterpoint.serving.native import ELEM_SIZE, LANES

SOURCE = Path(__file__).with_name("cpu_contrastive.c")


@functools.cache
def _contrastive_rows():
    fn = native.load(SOURCE).contrastive_rows
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


def _supports(z_e: torch.Tensor, z_a: torch.Tensor) -> bool:
    return (z_e.device.type == "cpu" == z_a.device.type and z_e.dim() == 2 and z_e.shape == z_a.shape
            and z_e.dtype == z_a.dtype and z_e.dtype in ELEM_SIZE and z_e.stride(-1) == 1 == z_a.stride(-1)
            and z_e.shape[1] % LANES == 0 and native.load(SOURCE) is not None)


def combine(z_e: torch.Tensor, z_a: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
            tau: torch.Tensor) -> torch.Tensor | None:
    """(R, V) expert and amateur logits and (R, 1) float32 α, β, τ -> (R, V) float32 combined logits,
    as contrastive.dense computes them up to float32 rounding; None where the C loop cannot run."""
    if not _supports(z_e, z_a):
        return None
    log_alpha, beta, tau = (t.reshape(-1).contiguous() for t in (torch.log(alpha), beta, tau))
    out = torch.empty(z_e.shape, dtype=torch.float32)
    _contrastive_rows()(z_e.data_ptr(), z_a.data_ptr(), z_e.stride(0), z_a.stride(0), log_alpha.data_ptr(),
                        beta.data_ptr(), tau.data_ptr(), out.data_ptr(), z_e.shape[0], z_e.shape[1],
                        ELEM_SIZE[z_e.dtype])
    return out
