"""The CPU path's small C libraries (paged_attention.c, cpu_norm.c, cpu_gemv.c, and cpu_step.c, which
strings them together): built once per CPU, loaded through ctypes.

They are plain C (GCC vector extensions and OpenMP, no torch headers), so the system C compiler
builds each in under a second, for the CPU at hand (`-march=native`), into the cache directory;
with OpenMP they run on torch's own thread pool (the same libgomp). Without a compiler, or with
COUNTERPOINT_CPU_KERNEL=0, the torch code they replace runs instead.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from counterpoint.serving.cache import cache_dir

logger = logging.getLogger("counterpoint")

DISABLE_ENV = "COUNTERPOINT_CPU_KERNEL"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LANES = 16  # floats per vector in the C sources: rows they take are multiples of it
ELEM_SIZE = {torch.float32: 4, torch.bfloat16: 2}  # the dtypes they read and write, as their elem_size


def _cpu_key() -> str:
    """What `-march=native` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines) + platform.machine()


def _build(compiler: str, sources: tuple[Path, ...], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # NOTE: built aside, then renamed: no half-written file
        target = Path(tmp) / out.name
        subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", str(target)], check=True, capture_output=True,
                       text=True)
        os.replace(target, out)


def _with_headers(sources: tuple[Path, ...]) -> list[Path]:
    """The sources and every local header they include (`#include "..."`), transitively: what a build reads."""
    files, todo = [], list(sources)
    while todo:
        path = todo.pop(0).resolve()
        if path not in files:
            files.append(path)
            todo += [path.parent / name for name in re.findall(r'#include "([^"]+)"', path.read_text())]
    return files


@functools.cache
def load(*sources: Path) -> ctypes.CDLL | None:
    """The library built from `sources` (C files), or None (no compiler, the build failed, or it is
    turned off). Each function they export is in it, and static ones stay private to their file."""
    name = sources[0].name
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: %s is not built and the slower torch path runs instead", name)
        return None
    read = b"".join(path.read_bytes() for path in _with_headers(sources))
    key = hashlib.sha256(read + " ".join([compiler, *FLAGS]).encode() + _cpu_key().encode())
    path = cache_dir() / "kernels" / f"{sources[0].stem}-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(compiler, sources, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("could not build %s (%s): the torch path runs instead", name, detail)
        return None


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """A tensor's data pointer, for a C argument."""
    return ctypes.c_void_p(t.data_ptr())
