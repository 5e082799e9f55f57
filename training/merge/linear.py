"""Linear (Wortsman et al. 2022, "Model soups"): Σ w_i θ_i / Σ w_i, or Σ w_i θ_i with
`normalize: false`. `weight` defaults to 1."""

from pathlib import Path

import torch

from counterpoint.training.merge.base import MergeConfig, register_method
from counterpoint.training.merge.tensorwise import TensorInputs, merge_tensorwise


def linear_tensor(inputs: TensorInputs) -> torch.Tensor:
    weights = [float(p.get("weight", 1.0)) for p in inputs.params]
    total = sum(w * t for w, t in zip(weights, inputs.tensors))
    if inputs.global_params.get("normalize", True):
        if sum(weights) == 0:
            raise ValueError(f"{inputs.name}: the weights sum to 0; set normalize: false or change them")
        total = total / sum(weights)
    return total


@register_method("linear")
def linear(config: MergeConfig, out: Path, show_progress: bool) -> Path:
    return merge_tensorwise(config, out, linear_tensor, needs_base=False, show_progress=show_progress)
