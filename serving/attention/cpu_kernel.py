"""The CPU decode-attention kernel (paged_decode.c): built once per CPU, loaded through ctypes.

torch has no op that reads a paged cache in place, so the torch path gathers every decoding
sequence's K and V into a dense copy each layer, then multiplies. This kernel reads the blocks
where they lie, K and V once per kv head. It is plain C (no torch headers), so the system C
compiler builds it in under a second, for the CPU at hand (`-march=native`), into the cache
directory; with OpenMP it runs on torch's own thread pool (the same libgomp). Without a compiler,
or with COUNTERPOINT_CPU_KERNEL=0, the torch path runs instead.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from counterpoint.serving.cache import cache_dir

logger = logging.getLogger("counterpoint")

SOURCE = Path(__file__).with_name("paged_decode.c")
DISABLE_ENV = "COUNTERPOINT_CPU_KERNEL"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ELEM_SIZE = {torch.float32: 4, torch.bfloat16: 2}
LANES = 16  # head_dim must be a multiple of the kernel's vector width


class Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("num_seqs", "num_heads", "num_kv_heads", "head_dim",
                                                     "num_blocks", "block_size", "q_stride", "table_stride",
                                                     "max_len", "elem_size")]


def _cpu_key() -> str:
    """What `-march=native` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines) + platform.machine()


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # NOTE: built aside, then renamed: no half-written file
        target = Path(tmp) / out.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(target)], check=True, capture_output=True, text=True)
        os.replace(target, out)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (no compiler, the build failed, or it is turned off)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention gathers the paged cache (slower)")
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode() + _cpu_key().encode())
    path = cache_dir() / "kernels" / f"paged_decode-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("could not build the CPU decode-attention kernel (%s): the torch path runs instead", detail)
        return None
    return lib


def supports(cache: torch.Tensor) -> bool:
    """Whether the kernel can read `cache` (a CPU cache, contiguous, float32 or bfloat16, head_dim a
    multiple of 16)."""
    return (cache.device.type == "cpu" and cache.dtype in ELEM_SIZE and cache.is_contiguous()
            and cache.shape[-1] % LANES == 0 and library() is not None)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class PagedDecode:
    """One step's decode batch: `attend` runs the kernel for one layer.

    tables (num_seqs, ≥ blocks) int64 and lens (num_seqs,) are the decoding sequences' block
    tables and context lengths."""

    def __init__(self, tables: torch.Tensor, lens: list[int], scale: float):
        self.lib = library()
        self.tables = tables.to(torch.int64).contiguous()
        self.lens = torch.tensor(lens, dtype=torch.int32)
        self.max_len = max(lens)
        self.scale = ctypes.c_float(scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q (num_seqs, num_heads, head_dim), rows possibly strided; kv_cache (2, Hkv, NB, bs, D),
        contiguous -> (num_seqs, num_heads, head_dim), in the cache's dtype."""
        num_seqs, num_heads, head_dim = q.shape
        q = q.to(kv_cache.dtype)
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        _, num_kv_heads, num_blocks, block_size, _ = kv_cache.shape
        shape = Shape(num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, q.stride(0),
                      self.tables.stride(0), self.max_len, ELEM_SIZE[q.dtype])
        scores = torch.empty(num_seqs, num_heads, self.max_len)
        self.lib.decode_scores(_ptr(q), _ptr(kv_cache), _ptr(self.tables), _ptr(self.lens), _ptr(scores),
                               ctypes.byref(shape), self.scale)
        probs = torch.softmax(scores, dim=-1)
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype)
        self.lib.decode_values(_ptr(probs), _ptr(kv_cache), _ptr(self.tables), _ptr(self.lens), _ptr(out),
                               ctypes.byref(shape))
        return out
