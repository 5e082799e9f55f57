"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"): singular vectors among the top k of a fine-tuned matrix whose cosine similarity to
every singular vector of the pre-trained matrix stays below a threshold ε. LoRA tends to add them;
full fine-tuning mostly rotates existing directions.
"""

from pathlib import Path

import torch

from counterpoint.training.merge.base import LazyModel

TOP_K = 10
THRESHOLD = 0.5


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, top_k: int = TOP_K,
                        threshold: float = THRESHOLD) -> int:
    """How many of tuned's top_k left singular vectors have |cos| < threshold with all of base's."""
    u_base = torch.linalg.svd(base.double(), full_matrices=False).U
    u_tuned = torch.linalg.svd(tuned.double(), full_matrices=False).U[:, :top_k]
    best = (u_tuned.T @ u_base).abs().max(dim=1).values
    return int((best < threshold).sum())


def count_intruders(base_dir: Path, tuned_dir: Path, names: list[str], top_k: int = TOP_K,
                    threshold: float = THRESHOLD) -> dict[str, int]:
    """Intruder dimensions of each named 2-D tensor of the tuned model against the base."""
    base, tuned = LazyModel(base_dir), LazyModel(tuned_dir)
    return {name: intruder_dimensions(base.get(name), tuned.get(name), top_k, threshold) for name in names}
