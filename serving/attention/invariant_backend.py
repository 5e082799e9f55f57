"""Batch-invariant attention on the torch path (`batch_invariant=True`): every new token attends
alone, over exactly its own context read back from the cache, always through the same ops on
tensors of the same shapes. Its result then cannot depend on what else the step holds: the other
sequences of the batch, how its prompt was cut into chunks, or a prefix-cache hit. It is slower
than the batched path; it exists for reproducibility."""

import torch

from counterpoint.serving.attention.base import AttentionBackend, AttentionMetadata, KVCache, register_backend, write_kv


@register_backend("torch_invariant")
class InvariantTorchAttention(AttentionBackend):
    def __init__(self, scale: float):
        self.scale = scale

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        self.meta, self.cache = meta, cache
        bs = meta.block_size
        self.store_blocks, self.store_offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
        self.tables = [meta.block_tables[i, : -(-context // bs)] for i, context in enumerate(meta.context_lens)]

    def attend(self, layer_idx, q, k, v):
        kv_cache = self.cache.layer(layer_idx)  # (2, Hkv, NB, bs, D)
        write_kv(kv_cache, self.store_blocks, self.store_offsets, k, v)
        num_kv_heads, head_dim = kv_cache.shape[1], kv_cache.shape[-1]
        out, row = torch.empty_like(q), 0
        for table, qlen, context in zip(self.tables, self.meta.query_lens, self.meta.context_lens):
            keys, values = kv_cache.index_select(2, table).view(2, num_kv_heads, -1, head_dim)  # (Hkv, L, D)
            for length in range(context - qlen + 1, context + 1):
                out[row] = self._one_token(q[row], keys[:, :length].contiguous(), values[:, :length].contiguous())
                row += 1
        return out

    def _one_token(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q (Hq, D) over keys/values (Hkv, L, D) -> (Hq, D)."""
        num_kv_heads, _, head_dim = keys.shape
        q = q.view(num_kv_heads, -1, head_dim)  # (Hkv, G, D)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale  # (Hkv, G, L)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values).reshape(-1, head_dim)
