"""The GPU attention backend: Triton kernels for the KV store, paged decode (split-K) and paged
prefill over the same cache layout as the torch backend. On the CPU it runs only under Triton's
interpreter, which the tests use."""

import torch

from counterpoint.kernels.kv_store import store_kv
from counterpoint.kernels.paged_decode import paged_decode
from counterpoint.kernels.paged_prefill import paged_prefill
from counterpoint.serving.attention.base import AttentionBackend, AttentionMetadata, KVCache, register_backend


@register_backend("triton")
class TritonAttention(AttentionBackend):
    def __init__(self, scale: float):
        self.scale = scale

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        # NOTE: every per-step tensor is built here once, from host lists: no device sync per layer.
        n = meta.num_decodes
        device = meta.block_tables.device
        as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        self.prepare_decode(cache, meta.slot_mapping, meta.block_tables.to(torch.int32), as_i32(meta.context_lens),
                            max(meta.context_lens[:n], default=0))
        self.num_decodes = n
        prefill_qlens = meta.query_lens[n:]
        self.query_starts = as_i32([sum(prefill_qlens[:i]) for i in range(len(prefill_qlens))])
        self.query_lens = as_i32(prefill_qlens)
        self.max_query_len = max(prefill_qlens, default=0)

    def prepare_decode(self, cache: KVCache, slot_mapping: torch.Tensor, tables: torch.Tensor,
                       context_lens: torch.Tensor, max_decode_len: int, long_tiles: bool = True) -> None:
        """A step of decodes alone over tensors the caller owns: the CUDA graphs' static buffers.
        `max_decode_len` (a host int) caps the split-K splits at the tiles of the longest context;
        `long_tiles`: see paged_decode."""
        self.cache, self.slot_mapping, self.tables, self.context_lens = cache, slot_mapping, tables, context_lens
        self.max_decode_len, self.long_tiles = max_decode_len, long_tiles
        self.num_decodes = tables.shape[0]

    def attend(self, layer_idx, q, k, v):
        kv_cache = self.cache.layer(layer_idx)
        store_kv(k, v, kv_cache, self.slot_mapping)
        n = self.num_decodes
        if n == q.shape[0]:
            return paged_decode(q, kv_cache, self.tables, self.context_lens, self.scale, self.max_decode_len,
                                long_tiles=self.long_tiles)
        out = torch.empty_like(q)
        if n:
            out[:n] = paged_decode(q[:n], kv_cache, self.tables[:n], self.context_lens[:n], self.scale,
                                   self.max_decode_len, long_tiles=self.long_tiles)
        out[n:] = paged_prefill(q[n:], kv_cache, self.tables[n:], self.query_starts, self.query_lens,
                                self.context_lens[n:], self.scale, self.max_query_len)
        return out
