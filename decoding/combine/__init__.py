"""Combine a hypothesis' stream logits into one vector (decoding/README.md, "Combine"): one module
per method, registered by name in `base.py`."""

from counterpoint.decoding.combine import acd, adacad, cad, contrastive  # noqa: F401  (register themselves)
from counterpoint.decoding.combine.base import METHODS, Combined, combine

__all__ = ["METHODS", "Combined", "combine"]
