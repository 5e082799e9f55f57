"""Paged attention for prefill and chunked prefill: a variable-length batch of query chunks,
causal within the chunk, attending to every earlier token of the sequence through its block table.

The chunk's own keys and values are stored in the cache first (kv_store), so one loop over the
block table covers cached context and new tokens alike. FlashAttention-style online softmax.
"""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.attention_tile import attend_tile
from counterpoint.kernels.checks import check_same_device, check_tensor, dot_precision, next_power_of_2, require

BLOCK_M = 16  # queries per program
BLOCK_N = 16  # keys per inner tile


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, tables_ptr, starts_ptr, qlens_ptr, lens_ptr, out_ptr, scale, block_size,
                    stride_qt, stride_qh, stride_c2, stride_ch, stride_cb, stride_co, stride_ts, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    qlen = tl.load(qlens_ptr + seq)
    if tile * BLOCK_M < qlen:
        q_start, length = tl.load(starts_ptr + seq), tl.load(lens_ptr + seq)
        m, d = tile * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
        m_ok, d_ok = m < qlen, d < HEAD_DIM
        q_pos = length - qlen + m  # absolute position of each query
        rows = (q_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        base = cache_ptr + (head // GROUP) * stride_ch
        last = tl.minimum(length, length - qlen + (tile + 1) * BLOCK_M)  # keys past the tile's last query: masked
        for n0 in range(0, last, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < last
            allowed = n_ok[None, :] & (n[None, :] <= q_pos[:, None])  # causal
            m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, base, tables_ptr + seq * stride_ts, n, n_ok, allowed, d,
                                        d_ok, block_size, scale, stride_c2, stride_cb, stride_co, PRECISION)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, scale: float,
                  max_query_len: int | None = None) -> torch.Tensor:
    """q: (T, Hq, D) of every sequence's new tokens, flattened; sequence s's queries start at row
    query_starts[s] and are the last query_lens[s] of its context_lens[s] tokens -> (T, Hq, D)."""
    _check(q, kv_cache, block_tables, query_starts, query_lens, context_lens)
    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    num_seqs = query_lens.shape[0]
    if num_seqs == 0:
        return out
    max_q = max_query_len if max_query_len is not None else int(query_lens.max())
    _prefill_kernel[(num_seqs, num_heads, triton.cdiv(max_q, BLOCK_M))](
        q, kv_cache, block_tables, query_starts, query_lens, context_lens, out, scale, kv_cache.shape[3],
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // kv_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=dot_precision(q.dtype),
    )
    return out


def _check(q, kv_cache, block_tables, query_starts, query_lens, context_lens) -> None:
    check_tensor(q, "q", 3)
    check_tensor(kv_cache, "kv_cache", 5)
    int_types = (torch.int32, torch.int64)
    check_tensor(block_tables, "block_tables", 2, dtypes=int_types)
    for name, t in (("query_starts", query_starts), ("query_lens", query_lens), ("context_lens", context_lens)):
        check_tensor(t, name, 1, dtypes=int_types)
        require(t.shape == query_lens.shape, f"{name} must have one entry per sequence ({query_lens.shape[0]})")
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, query_lens=query_lens)
    require(kv_cache.shape[0] == 2 and kv_cache.shape[4] == q.shape[2],
            f"kv_cache must be (2, Hkv, num_blocks, block_size, {q.shape[2]}); got {tuple(kv_cache.shape)}")
    require(q.shape[1] % kv_cache.shape[1] == 0, f"query heads ({q.shape[1]}) must be a multiple of KV heads "
            f"({kv_cache.shape[1]})")
    require(block_tables.shape[0] == query_lens.shape[0], "block_tables must have one row per sequence")
