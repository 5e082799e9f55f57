"""`merge CONFIG OUT`: mergekit-compatible YAML, one small file per method behind a registry."""

from counterpoint.training.merge.base import MERGE_METHODS, MergeConfig, run_merge
from counterpoint.training.merge import linear, passthrough, slerp, task_arithmetic  # noqa: F401  (each registers)

__all__ = ["MERGE_METHODS", "MergeConfig", "run_merge"]
