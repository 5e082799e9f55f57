"""Context-aware decoding, CAD (Shi et al. 2024, "Trusting Your Evidence: Hallucinate Less with
Context-aware Decoding"): c = (1+α)·z_ctx − α·z_noctx."""

import torch

from counterpoint.decoding.combine.base import Combined, register, row_values


@register("cad")
def cad(z_ctx: torch.Tensor, z_noctx: torch.Tensor, params: list, widths: list[int]) -> Combined:
    z_ctx, z_noctx = z_ctx.float(), z_noctx.float()
    alpha = row_values(params, "alpha", z_ctx.device)
    return Combined(((1 + alpha) * z_ctx).sub_(alpha * z_noctx))
