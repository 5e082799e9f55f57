"""Paged attention for decode: one query token per sequence against its block table.

Flash-decoding split-K (Dao et al. 2023): each program takes one (sequence, KV head, partition of
the context) with all the query heads that share the KV head (GQA), keeps an online softmax, and
writes an unnormalised partial result; a second kernel merges the partitions. So one long
sequence still spreads over many programs.
"""

import torch
import triton
import triton.language as tl

from counterpoint.kernels.attention_tile import attend_tile
from counterpoint.kernels.checks import check_same_device, check_tensor, dot_precision, next_power_of_2, require

BLOCK_N = 16  # keys per inner tile: tl.dot needs at least 16


@triton.jit
def _partition_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr, scale, block_size,
                      stride_qs, stride_qh, stride_c2, stride_ch, stride_cb, stride_co, stride_ts,
                      stride_as, stride_ah, stride_ap, stride_ms, stride_mh,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      PARTITION: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_ok, d_ok = g < GROUP, d < HEAD_DIM
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, length)
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    base = cache_ptr + kv_head * stride_ch
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, base, tables_ptr + seq * stride_ts, n, n_ok, n_ok[None, :],
                                    d, d_ok, block_size, scale, stride_c2, stride_cb, stride_co, PRECISION)
    out_rows = seq * stride_as + heads[:, None] * stride_ah + part * stride_ap + d[None, :]
    tl.store(acc_ptr + out_rows, acc, mask=g_ok[:, None] & d_ok[None, :])
    stat_rows = seq * stride_ms + heads * stride_mh + part
    tl.store(max_ptr + stat_rows, m_i, mask=g_ok)
    tl.store(sum_ptr + stat_rows, l_i, mask=g_ok)


@triton.jit
def _merge_kernel(acc_ptr, max_ptr, sum_ptr, lens_ptr, out_ptr, stride_as, stride_ah, stride_ap, stride_ms, stride_mh,
                  stride_os, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PARTITION: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    num_parts = tl.cdiv(tl.load(lens_ptr + seq), PARTITION)
    p, d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_D)
    p_ok = p < num_parts
    stats = seq * stride_ms + head * stride_mh + p
    m = tl.load(max_ptr + stats, mask=p_ok, other=float("-inf"))
    weight = tl.where(p_ok, tl.exp(m - tl.max(m, 0)), 0.0)  # (BLOCK_P,)
    total = tl.sum(tl.load(sum_ptr + stats, mask=p_ok, other=0.0) * weight, 0)
    acc = tl.load(acc_ptr + seq * stride_as + head * stride_ah + p[:, None] * stride_ap + d[None, :],
                  mask=p_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, max_context_len: int | None = None, partition_size: int = 512) -> torch.Tensor:
    """q: (S, Hq, D); kv_cache: (2, Hkv, num_blocks, block_size, D); block_tables: (S, max_blocks);
    context_lens: (S,) >= 1 -> (S, Hq, D). max_context_len (a host int) sizes the grid without a sync."""
    _check(q, kv_cache, block_tables, context_lens, partition_size)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[1]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_len = max_context_len if max_context_len is not None else int(context_lens.max())
    num_parts = triton.cdiv(max_len, partition_size)
    acc = torch.empty(num_seqs, num_heads, num_parts, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(2, num_seqs, num_heads, num_parts, dtype=torch.float32, device=q.device)
    group, block_d = num_heads // num_kv_heads, next_power_of_2(head_dim)
    _partition_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, kv_cache, block_tables, context_lens, acc, stats[0], stats[1], scale, kv_cache.shape[3],
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(1), stats.stride(2),
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PARTITION=partition_size, BLOCK_N=BLOCK_N, PRECISION=dot_precision(q.dtype),
    )
    _merge_kernel[(num_seqs, num_heads)](
        acc, stats[0], stats[1], context_lens, out, acc.stride(0), acc.stride(1), acc.stride(2),
        stats.stride(1), stats.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PARTITION=partition_size, BLOCK_P=max(2, next_power_of_2(num_parts)),
    )
    return out


def _check(q, kv_cache, block_tables, context_lens, partition_size) -> None:
    check_tensor(q, "q", 3)
    check_tensor(kv_cache, "kv_cache", 5)
    check_tensor(block_tables, "block_tables", 2, dtypes=(torch.int32, torch.int64))
    check_tensor(context_lens, "context_lens", 1, dtypes=(torch.int32, torch.int64))
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, context_lens=context_lens)
    num_seqs, num_heads, head_dim = q.shape
    require(kv_cache.shape[0] == 2 and kv_cache.shape[4] == head_dim,
            f"kv_cache must be (2, Hkv, num_blocks, block_size, {head_dim}); got {tuple(kv_cache.shape)}")
    require(num_heads % kv_cache.shape[1] == 0, f"query heads ({num_heads}) must be a multiple of KV heads "
            f"({kv_cache.shape[1]})")
    require(block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,),
            f"block_tables and context_lens must have {num_seqs} rows; got {tuple(block_tables.shape)} and "
            f"{tuple(context_lens.shape)}")
    require(partition_size % BLOCK_N == 0, f"partition_size must be a multiple of {BLOCK_N}; got {partition_size}")
