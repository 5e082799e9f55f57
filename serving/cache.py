"""The cache directory for what Counterpoint builds once: the bundled models, GGUF metadata."""

import os
from pathlib import Path

CACHE_ENV = "COUNTERPOINT_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "counterpoint")
