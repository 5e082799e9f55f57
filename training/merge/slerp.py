"""SLERP (Shoemake 1985, as mergekit applies it to weights): per tensor, on the flattened
tensors, θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1 with cos Ω the cosine of the two
directions; t = 0 gives base_model (θ_0), and nearly parallel tensors (|cos Ω| > 0.9995) are
interpolated linearly instead."""

import math
from pathlib import Path

import torch

from counterpoint.training.merge.base import MergeConfig, register_method
from counterpoint.training.merge.tensorwise import TensorInputs, merge_tensorwise

PARALLEL = 0.9995
EPS = 1e-8


def slerp_tensor(inputs: TensorInputs) -> torch.Tensor:
    t = inputs.global_params.get("t")
    if t is None:
        raise ValueError(f"{inputs.name}: slerp needs the parameter t")
    v0, v1 = inputs.base.float(), inputs.tensors[0].float()
    u0, u1 = v0.flatten() / (v0.norm() + EPS), v1.flatten() / (v1.norm() + EPS)
    cos = float(torch.clamp(u0 @ u1, -1.0, 1.0))
    if abs(cos) > PARALLEL:
        return ((1 - t) * v0 + t * v1).to(inputs.base.dtype)
    omega = math.acos(cos)
    s0, s1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return (s0 * v0 + s1 * v1).to(inputs.base.dtype)


@register_method("slerp")
def slerp(config: MergeConfig, out: Path, show_progress: bool) -> Path:
    others = [e for e in config.models if e.model != config.base_model]
    if len(others) != 1:
        raise ValueError(f"slerp merges exactly two models: base_model and one other; got {len(others)} others")
    return merge_tensorwise(config, out, slerp_tensor, needs_base=True, show_progress=show_progress)
