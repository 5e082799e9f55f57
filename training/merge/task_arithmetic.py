"""Task arithmetic and its sparsified, sign-elected forms, as one computation on the task vectors
δ_i = θ_i − θ_base with weights w_i (default 1):

- task_arithmetic (Ilharco et al. 2023): θ_base + λ Σ w_i δ_i;
- ties (Yadav et al. 2023, "TIES-Merging"): keep the `density` fraction of largest |δ_i| entries
  of each tensor, elect each entry's sign as that of Σ w_i δ_i, and take the disjoint mean over
  the models that agree with it, Σ w_i δ_i / Σ w_i over agreeing i (`normalize`, default true);
- dare_linear (Yu et al. 2024, "Language Models are Super Mario"): keep each entry of δ_i with
  probability `density` and rescale it by 1/density, then θ_base + λ Σ w_i δ_i;
- dare_ties: DARE's drop and rescale, then TIES's sign election and disjoint sum (normalize
  default false, as in mergekit).
λ is `lambda` (default 1). DARE's masks come from `seed` and the tensor's name, so a merge is
reproducible tensor by tensor.
"""

import zlib
from functools import partial
from pathlib import Path

import torch

from counterpoint.training.merge.base import MergeConfig, register_method
from counterpoint.training.merge.tensorwise import TensorInputs, merge_tensorwise

# method -> (sparsification, sign election, default normalize)
VARIANTS = {
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
}


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """δ with all but its round(density · n) largest-magnitude entries set to 0."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:
        mask[delta.abs().flatten().float().topk(k).indices] = True
    return delta * mask.view_as(delta)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def combine_deltas(inputs: TensorInputs, variant: str, seed: int) -> torch.Tensor:
    sparsify, elect, default_normalize = VARIANTS[variant]
    base = inputs.base
    deltas, weights = [], []
    generator = torch.Generator().manual_seed(seed ^ zlib.crc32(inputs.name.encode()))
    for tensor, params in zip(inputs.tensors, inputs.params):
        delta = tensor - base
        density = float(params.get("density", 1.0))
        if not 0 < density <= 1:
            raise ValueError(f"{inputs.name}: density must be in (0, 1]; got {density}")
        if sparsify == "magnitude":
            delta = keep_largest(delta, density)
        elif sparsify == "random":
            delta = drop_and_rescale(delta, density, generator)
        deltas.append(delta)
        weights.append(float(params.get("weight", 1.0)))
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *[1] * base.dim())
    if elect:
        agree = weighted.sign() == weighted.sum(0).sign()
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(base)
    if inputs.global_params.get("normalize", default_normalize):
        mixed = mixed / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base + float(inputs.global_params.get("lambda", 1.0)) * mixed


def _register(variant: str) -> None:
    @register_method(variant)
    def merge(config: MergeConfig, out: Path, show_progress: bool) -> Path:
        method = partial(combine_deltas, variant=variant, seed=config.seed)
        return merge_tensorwise(config, out, method, needs_base=True, show_progress=show_progress)


for _variant in VARIANTS:
    _register(_variant)
