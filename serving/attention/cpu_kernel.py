"""The CPU attention kernels (paged_attention.c), built and loaded by serving/native.py.

torch has no op that reads a paged cache in place, so the torch path gathers every decoding
sequence's K and V into a dense copy each layer, then multiplies. The decode kernel reads the
blocks where they lie, K and V once per kv head. The prefill kernel runs a chunk of one sequence's
new tokens against its whole context in one pass (an online softmax); torch's
scaled_dot_product_attention, which it replaces, was 1.5-3x slower in bfloat16 on prompts of 128
to 2048 tokens (`counterpoint bench kernels --device cpu`, "prefill attention", Zen 5). Where the
CPU has AMX tiles, torch's flash attention multiplies bfloat16 on them (oneDNN's brgemm) and the
kernel's float32 FMAs lose from about 128 new tokens: `prefers_sdpa` hands those chunks back.
"""

import ctypes
from pathlib import Path

import torch

from counterpoint.serving import native
from counterpoint.serving.models import cpu_gemv
from counterpoint.serving.native import ELEM_SIZE, LANES, ptr

SOURCE = Path(__file__).with_name("paged_attention.c")
# NOTE: prefill attention per layer, SmolLM2's heads on a 2-core Xeon VM, kernel against SDPA: 0.75x at 32 tokens,
# 0.93x at 64, 1.1x at 96, 1.2x at 128, 1.5x at 512, 2.5x at 2048; 128 new tokens on 1024 of context 1.7x
SDPA_TOKENS = 128


class Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("num_seqs", "num_heads", "num_kv_heads", "head_dim",
                                                     "num_blocks", "block_size", "q_stride", "table_stride",
                                                     "max_len", "elem_size")]


class PrefillShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("qlen", "context", "num_heads", "num_kv_heads", "head_dim",
                                                     "num_blocks", "block_size", "q_stride", "elem_size")]


def library() -> ctypes.CDLL | None:
    return native.load(SOURCE)


def supports(cache: torch.Tensor) -> bool:
    """Whether the kernel can read `cache` (a CPU cache, contiguous, float32 or bfloat16, head_dim a
    multiple of 16)."""
    return (cache.device.type == "cpu" and cache.dtype in ELEM_SIZE and cache.is_contiguous()
            and cache.shape[-1] % LANES == 0 and library() is not None)


def prefers_sdpa(dtype: torch.dtype, qlen: int) -> bool:
    """Whether torch's scaled_dot_product_attention beats the prefill kernel on a chunk of `qlen` new
    tokens: in bfloat16, from SDPA_TOKENS tokens, where the CPU has AMX tiles."""
    return dtype == torch.bfloat16 and qlen >= SDPA_TOKENS and cpu_gemv.available() == cpu_gemv.AMX


def _queries(q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """q (tokens, heads, head_dim) in the cache's dtype, heads and dims packed (rows may stay strided)."""
    q = q.to(kv_cache.dtype)
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


class PagedDecode:
    """One step's decode batch: `attend` runs the kernel for one layer.

    tables (num_seqs, ≥ blocks) int64 and lens (num_seqs,) are the decoding sequences' block
    tables and context lengths."""

    def __init__(self, tables: torch.Tensor, lens: list[int], scale: float):
        self.lib = library()
        self.tables = tables.to(torch.int64).contiguous()
        self.lens = torch.tensor(lens, dtype=torch.int32)
        self.max_len = -(-max(lens) // LANES) * LANES  # the scratch scores' rows: whole vectors
        self.scale = ctypes.c_float(scale)
        self.shape: Shape | None = None  # NOTE: every layer of the step has the same; made at the first

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q (num_seqs, num_heads, head_dim), rows possibly strided; kv_cache (2, Hkv, NB, bs, D),
        contiguous -> (num_seqs, num_heads, head_dim), in the cache's dtype."""
        num_seqs, num_heads, head_dim = q.shape
        q = _queries(q, kv_cache)
        shape = self._shape(q, kv_cache)
        scores = torch.empty(num_seqs, num_heads, self.max_len)  # NOTE: scratch; torch aligns it to 64 bytes
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype)
        self.lib.decode_attention(ptr(q), ptr(kv_cache), ptr(self.tables), ptr(self.lens), ptr(scores), ptr(out),
                                  shape, self.scale)
        return out

    def _shape(self, q: torch.Tensor, kv_cache: torch.Tensor):
        if self.shape is None or self.shape.q_stride != q.stride(0) or self.shape.elem_size != ELEM_SIZE[q.dtype]:
            num_seqs, num_heads, head_dim = q.shape
            _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
            self.shape = Shape(num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, q.stride(0),
                               self.tables.stride(0), self.max_len, ELEM_SIZE[q.dtype])
            self.shape_ref = ctypes.byref(self.shape)
        return self.shape_ref


def prefill(q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor, context: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's last q.shape[0] tokens (their keys and values already in
    `kv_cache`) over its first `context` tokens. q (qlen, num_heads, head_dim), rows possibly
    strided; table: the sequence's blocks -> (qlen, num_heads, head_dim), in the cache's dtype."""
    qlen, num_heads, head_dim = q.shape
    q = _queries(q, kv_cache)
    _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
    table = table.to(torch.int64).contiguous()
    shape = PrefillShape(qlen, context, num_heads, num_kv_heads, head_dim, num_blocks, block_size, q.stride(0),
                         ELEM_SIZE[q.dtype])
    out = torch.empty(qlen, num_heads, head_dim, dtype=q.dtype)
    library().prefill(ptr(q), ptr(kv_cache), ptr(table), ptr(out), ctypes.byref(shape), ctypes.c_float(scale))
    return out
