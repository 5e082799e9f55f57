"""Rotary position embedding (Su et al. 2021), rotate-half form as in transformers' Llama, applied
in place to queries and keys. Scaled variants (linear, llama3) differ only in the cos/sin table."""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.checks import check_same_device, check_tensor, next_power_of_2, require


@triton.jit
def _rotary_kernel(x_ptr, positions_ptr, cos_sin_ptr, stride_xt, stride_xh, stride_p,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    token, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_p + i, mask=ok, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_p + HALF + i, mask=ok, other=0.0)
    row = x_ptr + token * stride_xt + head * stride_xh
    x1 = tl.load(row + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(row + i, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(row + HALF + i, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) in place; positions (T,); cos_sin (P, D) float32, cos then sin."""
    check_tensor(x, "x", 3)
    check_tensor(positions, "positions", 1, dtypes=(torch.int32, torch.int64))
    check_tensor(cos_sin, "cos_sin", 2, dtypes=(torch.float32,))
    check_same_device(x=x, positions=positions, cos_sin=cos_sin)
    num_tokens, num_heads, head_dim = x.shape
    require(head_dim % 2 == 0 and cos_sin.shape[1] == head_dim,
            f"cos_sin must be (positions, {head_dim}) for an even head size; got {tuple(cos_sin.shape)}")
    require(positions.shape == (num_tokens,), f"positions must be ({num_tokens},); got {tuple(positions.shape)}")
    if num_tokens:
        _rotary_kernel[(num_tokens, num_heads)](x, positions, cos_sin, x.stride(0), x.stride(1), cos_sin.stride(0),
                                                HALF=head_dim // 2, BLOCK=next_power_of_2(head_dim // 2))
    return x
