"""AdaCAD (Wang et al. 2024, "AdaCAD: Adaptively Decoding to Balance Conflicts between Contextual
and Parametric Knowledge"): α = JSD(p_ctx ‖ p_noctx) in nats, floored at `min_alpha`, then
c = (1+α)·z_ctx − α·z_noctx."""

from collections.abc import Callable

import torch

from counterpoint.decoding.combine.base import Combined, register, row_values

PROB_FLOOR = 1e-9  # probabilities are clamped here before the logs
# A fused `jsd` per device type, registered by the server (its C loop on the CPU): fn(z_p, z_q) with
# jsd's result up to float32 rounding, or None where it cannot take them.
FUSED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {}


@register("adacad")
def adacad(z_ctx: torch.Tensor, z_noctx: torch.Tensor, params: list, widths: list[int]) -> Combined:
    z_ctx, z_noctx = z_ctx.float(), z_noctx.float()
    alpha = torch.maximum(jsd(z_ctx, z_noctx), row_values(params, "min_alpha", z_ctx.device)[:, 0])  # (R,)
    return Combined(((1 + alpha[:, None]) * z_ctx).sub_(alpha[:, None] * z_noctx), alpha)


def jsd(z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """(R, V) logits -> (R,) Jensen-Shannon divergence of their softmaxes, in nats."""
    fused = FUSED.get(z_p.device.type)
    d = fused(z_p, z_q) if fused else None
    if d is not None:
        return d
    # NOTE: in place where a temporary is not read again (each fresh full-size one costs the CPU new pages)
    p = torch.softmax(z_p, dim=-1).clamp_(min=PROB_FLOOR)
    q = torch.softmax(z_q, dim=-1).clamp_(min=PROB_FLOOR)
    log_m = (p + q).div_(2).log_()
    return 0.5 * p.log().sub_(log_m).mul_(p).sum(dim=-1) + 0.5 * q.log().sub_(log_m).mul_(q).sum(dim=-1)
