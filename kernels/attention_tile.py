"""The inner step both paged attention kernels share: gather one tile of keys and values
through the block table, then fold it into an online softmax (Milakov & Gimelshein 2018)."""

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, m_i, l_i, acc, base, table_row, n, n_ok, allowed, d, d_ok, block_size, scale,
                stride_c2, stride_cb, stride_co, PRECISION: tl.constexpr):
    """q (Q, D) against keys n (N,) of one KV head at `base`; allowed (Q, N) masks pairs.
    Returns the updated running max (Q,), sum (Q,) and unnormalised output (Q, D)."""
    block = tl.load(table_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
    rows = block * stride_cb + (n % block_size) * stride_co  # (N,) offsets of each key's row
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(base + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (N, D)
    scores = tl.dot(q, tl.trans(k).to(q.dtype), out_dtype=tl.float32, input_precision=PRECISION) * scale
    scores = tl.where(allowed, scores, float("-inf"))  # (Q, N)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # NOTE: a query row that sees no key keeps a finite max, so exp() never meets inf − inf.
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    v = tl.load(base + stride_c2 + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # (N, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc
