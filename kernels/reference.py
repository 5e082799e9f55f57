"""Torch references for every kernel, in one place: slow, obvious, float32 inside.

Layouts (shared with serving/attention.py):
- kv_cache of one layer: (2, Hkv, num_blocks, block_size, D); [0] keys, [1] values
- slot = block * block_size + offset; block_tables: (num_seqs, max_blocks) int
"""

import torch


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key, value: (T, Hkv, D) written at their slots; slots < 0 are padding and skipped."""
    bs = kv_cache.shape[3]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            kv_cache[0, :, slot // bs, slot % bs] = key[t]
            kv_cache[1, :, slot // bs, slot % bs] = value[t]


def _context(kv_cache: torch.Tensor, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` keys and values of one sequence: (Hkv, length, D) each, float32."""
    bs = kv_cache.shape[3]
    blocks = table[: -(-length // bs)].long()
    kv = kv_cache[:, :, blocks].flatten(2, 3)[:, :, :length].float()  # (2, Hkv, length, D)
    return kv[0], kv[1]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask) -> torch.Tensor:
    """q (Lq, Hq, D) against (Hkv, L, D) with GQA; mask (Lq, L) of allowed pairs."""
    group = q.shape[1] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # (Hq, L, D)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), keys) * scale  # (Hq, Lq, L)
    scores = scores.masked_fill(~mask[None], -float("inf"))
    return torch.einsum("hqk,hkd->qhd", torch.softmax(scores, -1), values)  # (Lq, Hq, D)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q: (S, Hq, D), one query token per sequence at the end of its context -> (S, Hq, D)."""
    out = torch.empty_like(q)
    for s, length in enumerate(context_lens.tolist()):
        keys, values = _context(kv_cache, block_tables[s], length)
        mask = torch.ones(1, length, dtype=torch.bool, device=q.device)
        out[s] = _attend(q[s : s + 1], keys, values, scale, mask)[0].to(q.dtype)
    return out


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (T, Hq, D), the new tokens of each sequence flattened; sequence s's queries are the last
    query_lens[s] of its context_lens[s] tokens (all already in the cache), causal -> (T, Hq, D)."""
    out = torch.empty_like(q)
    for s, (start, qlen, length) in enumerate(zip(query_starts.tolist(), query_lens.tolist(), context_lens.tolist())):
        keys, values = _context(kv_cache, block_tables[s], length)
        q_pos = torch.arange(length - qlen, length, device=q.device)[:, None]
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos  # (qlen, length)
        out[start : start + qlen] = _attend(q[start : start + qlen], keys, values, scale, mask).to(q.dtype)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) · weight, x + residual), normalised in float32 as in transformers."""
    total = x if residual is None else x + residual
    x32 = total.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, total


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x (T, H, D); cos_sin (P, D) float32 holds cos then sin per position."""
    cos, sin = cos_sin[positions.long()].float().chunk(2, dim=-1)  # (T, D/2) each
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                 group_size: int) -> torch.Tensor:
    """x (M, K) times the weight the packed codes encode (kernels/quant_matmul.py's layout) -> (M, N)."""
    per_word = 32 // bits
    k = qweight.shape[0] * per_word
    words = qweight.long() & 0xFFFFFFFF
    shifts = (torch.arange(k, device=x.device) % per_word) * bits
    codes = (words.repeat_interleave(per_word, 0) >> shifts[:, None]) & ((1 << bits) - 1)  # (K, N)
    groups = torch.arange(k, device=x.device) // group_size
    weight = codes.float() * scale.float()[groups] + offset.float()[groups]  # (K, N)
    return (x.float() @ weight).to(x.dtype)
