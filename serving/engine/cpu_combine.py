"""The combine stage's C loops on the CPU (cpu_combine.c, built by serving/native.py), registered by
the engine as the fused CPU paths of decoding/combine/: contrastive decoding's combination, the
row entropies of ACD and AdaCAD's Jensen-Shannon divergences.

The torch code makes several passes over (rows, vocab) float32 temporaries, and on the CPU each
fresh full-size temporary also costs new pages: contrastive decoding's combination for 16 rows of
a 49K vocabulary took 5-9 ms of a 45-60 ms step on a 2-core Xeon. The C loops read the logits where
they lie (bfloat16 or float32, no float32 copy first), keep each row in cache and write the result once.
"""

import ctypes
import functools
from pathlib import Path

import torch

from counterpoint.serving import native
from counterpoint.serving.native import ELEM_SIZE, LANES

SOURCE = Path(__file__).with_name("cpu_combine.c")


@functools.cache
def _contrastive_rows():
    fn = native.load(SOURCE).contrastive_rows
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


@functools.cache
def _entropy_rows():
    fn = native.load(SOURCE).entropy_rows
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


@functools.cache
def _jsd_rows():
    fn = native.load(SOURCE).jsd_rows
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
    fn.restype = None
    return fn


def _supports(*logits: torch.Tensor) -> bool:
    """CPU (rows, vocab) logits of one shape and dtype, float32 or bfloat16, vocab in whole vectors."""
    z = logits[0]
    return (all(t.device.type == "cpu" and t.shape == z.shape and t.dtype == z.dtype and t.stride(-1) == 1
                for t in logits)
            and z.dim() == 2 and z.dtype in ELEM_SIZE and z.shape[1] % LANES == 0 and native.load(SOURCE) is not None)


def contrastive(z_e: torch.Tensor, z_a: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
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


def entropy(z: torch.Tensor) -> torch.Tensor | None:
    """(R, V) logits -> (R,) float32 H(softmax(z)) in nats, as acd.entropy computes it up to float32
    rounding; None where the C loop cannot run."""
    if not _supports(z):
        return None
    h = torch.empty(z.shape[0], dtype=torch.float32)
    _entropy_rows()(z.data_ptr(), z.stride(0), h.data_ptr(), z.shape[0], z.shape[1], ELEM_SIZE[z.dtype])
    return h


def jsd(z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor | None:
    """(R, V) logits -> (R,) float32 JSD of their softmaxes in nats, as adacad.jsd computes it up to
    float32 rounding; None where the C loop cannot run."""
    if not _supports(z_p, z_q):
        return None
    d = torch.empty(z_p.shape[0], dtype=torch.float32)
    _jsd_rows()(z_p.data_ptr(), z_q.data_ptr(), z_p.stride(0), z_q.stride(0), d.data_ptr(), z_p.shape[0],
                z_p.shape[1], ELEM_SIZE[z_p.dtype])
    return d
