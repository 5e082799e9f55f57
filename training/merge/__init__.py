"""`merge CONFIG OUT`: mergekit-compatible YAML, one small file per method behind a registry."""

from counterpoint.training.merge.base import MERGE_METHODS, MergeConfig, run_merge
from counterpoint.training.merge import passthrough  # noqa: F401  (registers the method)

__all__ = ["MERGE_METHODS", "MergeConfig", "run_merge"]
