"""One quantized weight in a format-neutral form, which every checkpoint format converts into.

A (N, K) weight is stored as integer codes q (N, K), 0 ≤ q < 2^bits, with one scale s and one
offset o per row and group of `group_size` consecutive input columns:

    W_perm[n, k] = q[n, k] · s[n, k // group_size] + o[n, k // group_size]

GPTQ's (q − z)·s is o = −z·s; GGUF's Q4_1 d·q + m is o = m. With act-order (GPTQ's g_idx) the
columns are stored sorted by group, so that every group is contiguous: `perm` says which input
column each stored column holds (W[:, perm] = W_perm), and the layer reads x[:, perm].
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # (N, K) uint8 codes
    scale: torch.Tensor  # (N, K // group_size) float32
    offset: torch.Tensor  # (N, K // group_size) float32
    bits: int
    group_size: int
    perm: torch.Tensor | None = None  # (K,) int64: input column of each stored column

    def __post_init__(self):
        n, k = self.q.shape
        groups = k // self.group_size
        if k % self.group_size or self.scale.shape != (n, groups) or self.offset.shape != (n, groups):
            raise ValueError(f"codes {tuple(self.q.shape)} with group_size {self.group_size} need scales and "
                             f"offsets of shape {(n, groups)}; got {tuple(self.scale.shape)} and "
                             f"{tuple(self.offset.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight in the input's column order."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        w = self.q.float() * expand(self.scale) + expand(self.offset)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def with_group_size(self, group_size: int) -> "QuantizedWeight":
        """The same weight with groups split into smaller ones (scales repeated): exact, for kernels
        that take only some group sizes."""
        if self.group_size % group_size:
            raise ValueError(f"group_size {self.group_size} is not a multiple of {group_size}")
        factor = self.group_size // group_size
        return QuantizedWeight(self.q, self.scale.repeat_interleave(factor, 1),
                               self.offset.repeat_interleave(factor, 1), self.bits, group_size, self.perm)


def from_group_index(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                     g_idx: torch.Tensor) -> QuantizedWeight:
    """Codes whose input column k belongs to group g_idx[k], with scale/offset (N, groups): sorted
    into contiguous groups. Groups of different sizes (GPTQ's shorter last group when the group
    size does not divide K) are split into pieces of their greatest common size."""
    g_idx = g_idx.long()
    counts = torch.bincount(g_idx, minlength=scale.shape[1])
    if len(counts) != scale.shape[1] or (counts == 0).any():
        raise ValueError(f"g_idx names {len(counts)} groups, {int((counts > 0).sum())} of them used, but there "
                         f"are {scale.shape[1]} scales per row")
    size = math.gcd(*counts.tolist())
    pieces = counts // size
    scale, offset = scale.repeat_interleave(pieces, dim=1), offset.repeat_interleave(pieces, dim=1)
    if bool((g_idx[1:] >= g_idx[:-1]).all()):
        return QuantizedWeight(q, scale, offset, bits, size)
    perm = torch.argsort(g_idx, stable=True)
    return QuantizedWeight(q[:, perm].contiguous(), scale, offset, bits, size, perm)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dimension (q, k, v into one qkv): they must agree on bits,
    group size and column order."""
    first = parts[0]
    for part in parts[1:]:
        same_perm = (part.perm is None) == (first.perm is None) and (
            part.perm is None or torch.equal(part.perm, first.perm))
        if part.bits != first.bits or part.group_size != first.group_size or not same_perm:
            raise ValueError("weights with different bits, group size or act-order cannot be stacked")
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.offset for p in parts]), first.bits, first.group_size, first.perm)


def can_stack(parts: list[QuantizedWeight]) -> bool:
    try:
        concat_rows(parts)
    except ValueError:
        return False
    return True
