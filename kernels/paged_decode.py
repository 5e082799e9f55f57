"""Paged attention for decode: one query token per sequence against its block table.

Flash-decoding split-K (Dao et al. 2023): each program takes one (sequence, KV head, split of
the context) with all the query heads that share the KV head (GQA), keeps an online softmax, and
writes an unnormalised partial result; a second kernel merges the splits. The number of splits
is chosen on the host to fill the GPU (a few programs per SM), and each sequence cuts its own
context into that many equal runs of whole tiles. So one long sequence still spreads over many
programs, and the grid depends on the batch alone, never on the context length: one CUDA graph
serves every context.
"""

import functools

import torch
import triton
import triton.language as tl

from counterpoint.kernels.attention_tile import attend_tile
from counterpoint.kernels.checks import check_same_device, check_tensor, dot_precision, next_power_of_2, require

BLOCK_N = 16  # keys per inner tile: tl.dot needs at least 16
# NOTE: a split that runs over many keys streams them faster in bigger tiles (more loads in flight
# per iteration); on an H200 64-key tiles took 1.9x less time at 1 x 32768 keys and 1.6x at
# 64 x 2048, but 1.6x more at 8 x 512, hence only from LONG_SPLIT keys per split on (by the
# host's bound on the longest context).
LONG_BLOCK_N = 64
LONG_SPLIT = 512
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # NOTE: several programs in flight per SM keep enough loads outstanding to stream K and V


@triton.jit
def _partition_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, acc_ptr, max_ptr, sum_ptr, scale, block_size,
                      num_splits, stride_qs, stride_qh, stride_c2, stride_ch, stride_cb, stride_co, stride_ts,
                      stride_as, stride_ah, stride_ap, stride_ms, stride_mh,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_ok, d_ok = g < GROUP, d < HEAD_DIM
    per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), num_splits) * BLOCK_N  # whole tiles of keys
    start = part * per_split
    end = tl.minimum(start + per_split, length)  # NOTE: start >= end for a split past the context: stays empty
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
def _merge_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, num_splits, stride_as, stride_ah, stride_ap, stride_ms,
                  stride_mh, stride_os, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    p, d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_D)
    p_ok = p < num_splits  # an empty split has max −inf and sum 0: weight 0
    stats = seq * stride_ms + head * stride_mh + p
    m = tl.load(max_ptr + stats, mask=p_ok, other=float("-inf"))
    weight = tl.where(p_ok, tl.exp(m - tl.max(m, 0)), 0.0)  # (BLOCK_P,)
    total = tl.sum(tl.load(sum_ptr + stats, mask=p_ok, other=0.0) * weight, 0)
    acc = tl.load(acc_ptr + seq * stride_as + head * stride_ah + p[:, None] * stride_ap + d[None, :],
                  mask=p_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(out_ptr + seq * stride_os + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, max_context_len: int | None = None, num_splits: int | None = None,
                 long_tiles: bool = True) -> torch.Tensor:
    """q: (S, Hq, D); kv_cache: (2, Hkv, num_blocks, block_size, D); block_tables: (S, max_blocks);
    context_lens: (S,) >= 1 -> (S, Hq, D). max_context_len (a host int) bounds the splits without a
    sync; num_splits (default: default_num_splits) sets the programs per (sequence, KV head).
    long_tiles=False keeps 16-key tiles whatever max_context_len says: a CUDA graph captured at the
    longest context replays at short ones too."""
    _check(q, kv_cache, block_tables, context_lens, num_splits)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[1]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_len = max_context_len
    if num_splits is None:
        max_len = max_len if max_len is not None else int(context_lens.max())
        num_splits = default_num_splits(num_seqs, num_kv_heads, max_len, q.device)
    long_splits = long_tiles and max_len is not None and max_len >= LONG_SPLIT * num_splits
    block_n = LONG_BLOCK_N if long_splits else BLOCK_N
    acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(2, num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    group, block_d = num_heads // num_kv_heads, next_power_of_2(head_dim)
    _partition_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, context_lens, acc, stats[0], stats[1], scale, kv_cache.shape[3], num_splits,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2), stats.stride(1), stats.stride(2),
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
    )
    _merge_kernel[(num_seqs, num_heads)](
        acc, stats[0], stats[1], out, num_splits, acc.stride(0), acc.stride(1), acc.stride(2),
        stats.stride(1), stats.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=max(2, next_power_of_2(num_splits)),
    )
    return out


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) for about PROGRAMS_PER_SM programs on every SM, no more
    than the longest context has tiles, and at most MAX_SPLITS."""
    wanted = -(-PROGRAMS_PER_SM * _num_sms(device) // (num_seqs * num_kv_heads))
    return max(1, min(wanted, -(-max_context_len // BLOCK_N), MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (1 off CUDA: the interpreter gains nothing from splits)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _check(q, kv_cache, block_tables, context_lens, num_splits) -> None:
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
    require(num_splits is None or 1 <= num_splits <= MAX_SPLITS,
            f"num_splits must be in [1, {MAX_SPLITS}]; got {num_splits}")
