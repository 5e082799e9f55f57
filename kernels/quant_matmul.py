"""Weight-only quantized matmul: y = x · Wᵀ with W stored as 4- or 8-bit codes, dequantized in
registers tile by tile (the weight is read once, at a quarter or half of bf16's bytes).

Layout (serving/quant/weight.py's format-neutral form, packed for coalesced loads along N):
- qweight int32 (K · bits / 32, N): code of input k, output n in bits [bits·(k % p), bits·(k % p + 1))
  of qweight[k // p, n], p = 32 / bits (GPTQ's qweight layout);
- scale, offset float32 (K / group_size, N): W[n, k] = q · scale[g, n] + offset[g, n], g = k // group_size.
Act-order weights are stored with sorted groups; the caller permutes x's columns first.

Small batches (decode) leave few output tiles to spread over the GPU, so K is split too: each
split writes a float32 partial sum and the splits are added in a fixed order (deterministic).
"""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.checks import check_same_device, check_tensor, dot_precision, require

BLOCK_K = 32


@triton.jit
def _quant_matmul_kernel(x_ptr, qweight_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, K_PER_SPLIT, stride_xm,
                         stride_os, stride_om, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PER_WORD: tl.constexpr = 32 // BITS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0)
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=n_ok[None, :],
                        other=0)
        codes = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & ((1 << BITS) - 1)
        group = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        scale = tl.load(scale_ptr + group, mask=n_ok[None, :], other=0.0)
        offset = tl.load(offset_ptr + group, mask=n_ok[None, :], other=0.0)
        w = (codes.to(tl.float32) * scale + offset).to(x.dtype)
        acc += tl.dot(x, w, input_precision=PRECISION)
    ptrs = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def split_count(m: int, n: int, k: int, block_n: int) -> int:
    """K splits so that small batches still give about 128 tiles, each split a whole number of BLOCK_Ks."""
    tiles = -(-m // 16) * -(-n // block_n)
    splits = max(1, min(k // BLOCK_K, 128 // tiles))
    while (k // BLOCK_K) % splits:
        splits -= 1
    return splits


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                 group_size: int, num_splits: int | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N) in x's dtype."""
    check_tensor(x, "x", 2)
    check_tensor(qweight, "qweight", 2, dtypes=(torch.int32,))
    check_tensor(scale, "scale", 2, dtypes=(torch.float32,))
    check_tensor(offset, "offset", 2, dtypes=(torch.float32,))
    check_same_device(x=x, qweight=qweight, scale=scale, offset=offset)
    m, k = x.shape
    n = qweight.shape[1]
    require(bits in (4, 8), f"bits must be 4 or 8; got {bits}")
    require(k % BLOCK_K == 0 and qweight.shape[0] * 32 // bits == k,
            f"x's {k} columns must be a multiple of {BLOCK_K} and match qweight {tuple(qweight.shape)} at {bits} bits")
    require(group_size % BLOCK_K == 0 and k % group_size == 0,
            f"group_size must be a multiple of {BLOCK_K} dividing {k}; got {group_size}")
    require(scale.shape == offset.shape == (k // group_size, n),
            f"scale and offset must be {(k // group_size, n)}; got {tuple(scale.shape)}, {tuple(offset.shape)}")
    block_n = 64 if n >= 64 else 32
    splits = num_splits or split_count(m, n, k, block_n)
    require(k % (splits * BLOCK_K) == 0, f"num_splits {splits} must divide K / {BLOCK_K} = {k // BLOCK_K}")
    out = torch.empty(splits, m, n, dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, 16), triton.cdiv(n, block_n), splits)
        _quant_matmul_kernel[grid](x, qweight, scale, offset, out, m, n, k, k // splits, x.stride(0), out.stride(0),
                                   out.stride(1), BITS=bits, GROUP=group_size, BLOCK_M=16, BLOCK_N=block_n,
                                   BLOCK_K=BLOCK_K, PRECISION=dot_precision(x.dtype))
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)
