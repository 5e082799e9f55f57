"""The CPU attention path: decodes batched, through the paged-decode kernel (cpu_kernel.py) or, without
it, in plain torch over a gathered, padded tile; prefill chunks one sequence at a time, through the
prefill kernel or, without it or where it is slower (cpu_kernel.prefers_sdpa), scaled_dot_product_attention."""

import torch
import torch.nn.functional as F

from counterpoint.serving.attention import cpu_kernel
from counterpoint.serving.attention.base import AttentionBackend, AttentionMetadata, KVCache, register_backend, write_kv
from counterpoint.serving.models.cpu_linear import compute_dtype


@register_backend("torch")
class TorchAttention(AttentionBackend):
    """CPU path: decodes batched (the C kernel, or a gathered tile with a padding bias), prefill
    chunks one sequence at a time."""

    def __init__(self, scale: float):
        self.scale = scale
        self.use_kernel = True  # False: the gather path even where the kernel is built (its baseline)
        cpu_kernel.library()  # NOTE: built (or found wanting) as the model loads, not on the first request

    def prepare(self, meta: AttentionMetadata, cache: KVCache) -> None:
        self.meta, self.cache = meta, cache
        self.compute = compute_dtype(cache.data.dtype, cache.data.device)
        bs, n = meta.block_size, meta.num_decodes
        self.store_blocks = meta.slot_mapping // bs
        self.store_offsets = meta.slot_mapping % bs
        self.decode_tables = self.decode_bias = self.paged = None
        self.kernel = self.use_kernel and cpu_kernel.supports(cache.data)
        if n and self.kernel:
            self.paged = cpu_kernel.PagedDecode(meta.block_tables[:n], meta.context_lens[:n], self.scale)
        elif n:
            num_blocks = -(-max(meta.context_lens[:n]) // bs)
            self.decode_tables = meta.block_tables[:n, :num_blocks].reshape(-1)  # (Bd·nblk,)
            lens = torch.tensor(meta.context_lens[:n], device=meta.block_tables.device)
            is_pad = torch.arange(num_blocks * bs, device=lens.device) >= lens[:, None]  # (Bd, L)
            self.decode_bias = torch.zeros(is_pad.shape, device=lens.device).masked_fill(is_pad, -float("inf"))
        dtype = cache.data.dtype
        self.prefill_kernel = [self.kernel and not cpu_kernel.prefers_sdpa(dtype, qlen) for qlen in meta.query_lens[n:]]
        # NOTE: without the kernel, a chunk with no earlier context attends to its own keys alone: no table
        self.prefill_tables = [
            meta.block_tables[i, : -(-context // bs)] if context > qlen or kernel else None
            for i, (context, qlen, kernel) in enumerate(
                zip(meta.context_lens[n:], meta.query_lens[n:], self.prefill_kernel), start=n)
        ]

    def attend(self, layer_idx, q, k, v):
        kv_cache = self.cache.layer(layer_idx)  # (2, Hkv, NB, bs, D)
        write_kv(kv_cache, self.store_blocks, self.store_offsets, k, v)
        n = self.meta.num_decodes
        if n == q.shape[0]:
            return self._decode(q, kv_cache)
        out = torch.empty_like(q)
        if n:
            out[:n] = self._decode(q[:n], kv_cache)
        start = n
        for i, table in enumerate(self.prefill_tables):
            end = start + self.meta.query_lens[n + i]
            context = self.meta.context_lens[n + i]
            out[start:end] = self._prefill(q[start:end], k[start:end], v[start:end], table, context, kv_cache,
                                           self.prefill_kernel[i])
            start = end
        return out

    def _decode(self, q, kv_cache):
        if self.paged is not None:
            return self.paged.attend(q, kv_cache).to(q.dtype)
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[1]
        gathered = kv_cache.index_select(2, self.decode_tables)  # (2, Hkv, Bd·nblk, bs, D)
        keys, values = gathered.to(self.compute).view(2, num_kv_heads, num_seqs, -1, head_dim)  # (Hkv, Bd, L, D)
        q = q.to(self.compute).view(num_seqs, num_kv_heads, -1, head_dim).transpose(0, 1)  # (Hkv, Bd, G, D)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale  # (Hkv, Bd, G, L)
        probs = torch.softmax(scores + self.decode_bias[None, :, None, :], dim=-1).to(self.compute)
        out = torch.matmul(probs, values)  # (Hkv, Bd, G, D)
        return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim).to(gathered.dtype)

    def _prefill(self, q, k, v, table, context, kv_cache, kernel):
        if kernel:
            return cpu_kernel.prefill(q, kv_cache, table, context, self.scale).to(q.dtype)
        qlen = q.shape[0]
        if table is None:
            keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True  # (Hkv, L, D)
        else:
            num_kv_heads, head_dim = kv_cache.shape[1], kv_cache.shape[-1]
            gathered = kv_cache.index_select(2, table).view(2, num_kv_heads, -1, head_dim)[:, :, :context]
            keys, values = gathered  # (Hkv, L, D) each
            q_pos = torch.arange(qlen, device=q.device)[:, None] + (context - qlen)
            mask = torch.arange(context, device=q.device)[None, :] <= q_pos  # (qlen, L)
            causal = False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
        )  # (1, Hq, qlen, D)
        return out[0].transpose(0, 1)
