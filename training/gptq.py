"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), and round-to-nearest with the same grid as its baseline.

For a linear layer W (N outputs, K inputs) and its calibration inputs X, GPTQ quantizes the
columns of W one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian of ‖WX − ŴX‖², H = 2XXᵀ/n:
- dead inputs (H_kk = 0) get H_kk = 1 and a zero weight column;
- act-order: columns in order of decreasing H_kk;
- damping: H += 0.01·mean(diag H)·I; then the upper Cholesky factor U of H⁻¹;
- lazy batches of 128 columns: within a batch, w_j's error (w_j − q_j)/U_jj updates the batch's
  later columns at once; the batch's errors update the rest of W in one matmul;
- groups: a group's scale and zero come from its columns as they are when the group starts (after
  the earlier columns' updates), as in the reference implementation.
"""

from dataclasses import dataclass

import torch

BLOCK = 128
DAMP = 0.01


@dataclass
class Grid:
    """Integer codes 0..2^bits − 1 with w ≈ (q − zero)·scale per row (and group)."""

    bits: int
    sym: bool
    min_zero: int = 0  # the gptq v1 layout stores zero − 1 in `bits` bits, so it cannot store 0

    @property
    def top(self) -> int:
        return 2**self.bits - 1

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of w (N, cols): scale and zero (N,) covering the row's range and 0."""
        lo = w.min(1).values.clamp(max=0)
        hi = w.max(1).values.clamp(min=0)
        if self.sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        empty = (lo == 0) & (hi == 0)
        lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
        scale = (hi - lo) / self.top
        if self.sym:
            zero = torch.full_like(scale, (self.top + 1) // 2)
        else:
            zero = torch.round(-lo / scale).clamp(self.min_zero, self.top)
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes of w with scale and zero of the same (or a broadcastable) shape."""
        return torch.clamp(torch.round(w / scale) + zero, 0, self.top)


@dataclass
class Quantized:
    """A layer's codes (N, K) in input order, scales and zeros (groups, N), and g_idx (K,)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return (self.codes - self.zeros[self.g_idx].T) * self.scales[self.g_idx].T


def group_columns(k: int, group_size: int) -> int:
    """Columns per group; the last group is shorter when group_size does not divide K (as in
    AutoGPTQ: 576 inputs in groups of 128 are 4 groups of 128 and one of 64)."""
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive; got {group_size}")
    return k if group_size == -1 else group_size


def rtn(w: torch.Tensor, grid: Grid, group_size: int) -> Quantized:
    """Round to nearest, group by group."""
    n, k = w.shape
    size = group_columns(k, group_size)
    fits = [grid.fit(w[:, i : i + size]) for i in range(0, k, size)]
    scales, zeros = torch.stack([f[0] for f in fits]), torch.stack([f[1] for f in fits])
    g_idx = torch.arange(k) // size
    return Quantized(grid.codes(w, scales[g_idx].T, zeros[g_idx].T), scales, zeros, g_idx)


def gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, group_size: int, act_order: bool) -> Quantized:
    """GPTQ of w (N, K) given H (K, K); float64 for the Hessian algebra."""
    w = w.double().clone()
    n, k = w.shape
    size = group_columns(k, group_size)
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += DAMP * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = torch.zeros(n, end - start, dtype=w.dtype)
        for j in range(start, end):
            if j % size == 0:
                scale, zero = grid.fit(w[:, j : j + size])
                scales.append(scale)
                zeros.append(zero)
            codes[:, j] = grid.codes(w[:, j], scale, zero)
            error = (w[:, j] - (codes[:, j] - zero) * scale) / u[j, j]
            w[:, j:end] -= error[:, None] * u[j, j:end][None, :]
            errors[:, j - start] = error
        w[:, end:] -= errors @ u[start:end, end:]
    inverse = torch.argsort(perm)
    g_idx = (torch.arange(k) // size)[inverse]
    return Quantized(codes[:, inverse].float(), torch.stack(scales).float(), torch.stack(zeros).float(), g_idx)
