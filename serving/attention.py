"""Attention over a paged KV cache behind a small backend interface.

The runner builds one `AttentionMetadata` per step; the backend turns it once into whatever it
needs (`prepare`), then `attend` is called for every layer. The torch backend here is the CPU
path; the Triton backend plugs in behind the same two methods.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """One step's batch layout. Sequences are ordered decodes first (query length 1)."""

    slot_mapping: torch.Tensor  # (T,) flat cache slot of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    query_lens: list[int]  # (B,) new tokens of each sequence this step
    context_lens: list[int]  # (B,) tokens of each sequence once this step is done
    num_decodes: int  # the first num_decodes sequences have query length 1
    block_size: int


class KVCache:
    """K and V for every layer: (layers, 2, num_blocks, block_size, kv_heads, head_dim)."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx, 0], self.data[idx, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's contents to block dst, in every layer."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.data.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]


class AttentionBackend:
    """Base class: `prepare` once per step, then `attend` once per layer."""

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        raise NotImplementedError

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) of the new tokens -> (T, Hq, D). Stores k/v in the cache."""
        raise NotImplementedError


BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str):
    def wrap(cls):
        BACKENDS[name] = cls
        return cls

    return wrap


def create_backend(name: str, scale: float) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return BACKENDS[name](scale)


def context_slots(block_tables: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """(B, context_len) flat cache slot of every context position of each sequence."""
    pos = torch.arange(context_len, device=block_tables.device)
    blocks = block_tables[:, pos // block_size]  # (B, L)
    return blocks * block_size + pos % block_size


@register_backend("torch")
class TorchAttention(AttentionBackend):
    """CPU path: decodes batched with a padding mask, prefill chunks one sequence at a time."""

    def __init__(self, scale: float):
        self.scale = scale

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        self.meta, self.cache = meta, cache
        n = meta.num_decodes
        self.decode_slots = self.decode_mask = None
        if n:
            lens = torch.tensor(meta.context_lens[:n], device=meta.block_tables.device)
            max_len = max(meta.context_lens[:n])
            self.decode_slots = context_slots(meta.block_tables[:n], max_len, meta.block_size)  # (Bd, L)
            self.decode_mask = (torch.arange(max_len, device=lens.device) < lens[:, None])[:, None, None, :]
        self.prefill_slots = [
            context_slots(meta.block_tables[i : i + 1], meta.context_lens[i], meta.block_size)[0]
            if meta.context_lens[i] > meta.query_lens[i] else None
            for i in range(n, len(meta.query_lens))
        ]

    def attend(self, layer_idx, q, k, v):
        k_cache, v_cache = self.cache.layer(layer_idx)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, self.meta.slot_mapping, k)
        flat_v.index_copy_(0, self.meta.slot_mapping, v)
        out = torch.empty_like(q)
        n = self.meta.num_decodes
        if n:
            out[:n] = self._decode(q[:n], flat_k, flat_v)
        start = n
        for i, slots in enumerate(self.prefill_slots):
            qlen = self.meta.query_lens[n + i]
            end = start + qlen
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], slots, flat_k, flat_v)
            start = end
        return out

    def _decode(self, q, flat_k, flat_v):
        keys = flat_k[self.decode_slots].transpose(1, 2)  # (Bd, Hkv, L, D)
        values = flat_v[self.decode_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=self.decode_mask, scale=self.scale, enable_gqa=True
        )  # (Bd, Hq, 1, D)
        return out.squeeze(2)

    def _prefill(self, q, k, v, slots, flat_k, flat_v):
        qlen = q.shape[0]
        if slots is None:
            keys, values, mask, causal = k, v, None, True
        else:
            keys, values = flat_k[slots], flat_v[slots]  # (L, Hkv, D)
            offset = slots.shape[0] - qlen
            q_pos = torch.arange(qlen, device=q.device)[:, None] + offset
            mask = torch.arange(slots.shape[0], device=q.device)[None, :] <= q_pos  # (qlen, L)
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
        )  # (1, Hq, qlen, D)
        return out[0].transpose(0, 1)
