"""Fused residual add + RMSNorm (Zhang & Sennrich 2019): one read of x and the residual, one
write of each result, normalised in float32 with transformers' rounding points."""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.checks import check_same_device, check_tensor, next_power_of_2, require


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, eps, stride_x, stride_r, stride_o,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=ok)  # the sum becomes the next residual
    x32 = x.to(tl.float32)
    normed = x32 * tl.rsqrt(tl.sum(x32 * x32, 0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    out = weight * normed.to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (T, hidden). Returns (norm(x + residual) · weight, x + residual); the sum is
    written into `residual` in place (or, without a residual, x itself is returned as the sum)."""
    check_tensor(x, "x", 2)
    check_tensor(weight, "weight", 1)
    require(weight.shape[0] == x.shape[1], f"weight must have {x.shape[1]} entries; got {weight.shape[0]}")
    if residual is not None:
        check_tensor(residual, "residual", 2)
        require(residual.shape == x.shape and residual.dtype == x.dtype,
                f"residual must match x ({tuple(x.shape)}, {x.dtype}); got {tuple(residual.shape)}, {residual.dtype}")
        check_same_device(x=x, residual=residual, weight=weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x.shape[0]:
        res = residual if residual is not None else x
        _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, eps, x.stride(0), res.stride(0), out.stride(0),
                                        HIDDEN=x.shape[1], BLOCK=next_power_of_2(x.shape[1]),
                                        HAS_RESIDUAL=residual is not None)
    return out, residual if residual is not None else x
