"""Adaptive contrastive decoding, ACD (Kim et al., Findings of EMNLP 2024, "Adaptive Contrastive
Decoding in Retrieval-Augmented Generation for Handling Noisy Contexts"): each step
w = H(p_noctx) / (H(p_noctx) + H(p_ctx)), clamped to [0, 1], and c = z_noctx + w·(z_ctx − z_noctx).
Documents that make the model surer pull w to 1; noisy ones push it down, and the model's own
knowledge leads."""

from collections.abc import Callable

import torch

from counterpoint.decoding.combine.base import Combined, register

ENTROPY_FLOOR = 1e-6  # both entropies below this: w = 0.5
# A fused `entropy` per device type, registered by the server (its C loop on the CPU): fn(z) with
# entropy's result up to float32 rounding, or None where it cannot take z.
FUSED: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {}


@register("acd")
def acd(z_ctx: torch.Tensor, z_noctx: torch.Tensor, params: list, widths: list[int]) -> Combined:
    z_ctx, z_noctx = z_ctx.float(), z_noctx.float()
    h_ctx, h_noctx = entropy(z_ctx), entropy(z_noctx)  # (R,)
    both_tiny = (h_ctx < ENTROPY_FLOOR) & (h_noctx < ENTROPY_FLOOR)
    # NOTE: where both are tiny the ratio is not used; the clamp only keeps 0/0 out of it.
    ratio = h_noctx / (h_ctx + h_noctx).clamp(min=ENTROPY_FLOOR)
    w = torch.where(both_tiny, torch.full_like(ratio, 0.5), ratio).clamp(0, 1)
    # NOTE: built in place (each fresh full-size temporary costs the CPU new pages): z_noctx + w·(z_ctx − z_noctx)
    return Combined((z_ctx - z_noctx).mul_(w[:, None]).add_(z_noctx), w)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """(R, V) logits -> (R,) H(softmax(z)) in nats, with 0·ln 0 = 0."""
    fused = FUSED.get(z.device.type)
    h = fused(z) if fused else None
    if h is not None:
        return h
    # NOTE: −Σ p·ln p from ln p, in place: torch.special.entr is not vectorised on the CPU (2x slower in all).
    # Where ln p = −inf, p·ln p is 0·−inf, NaN: it is p = 0's 0.
    log_p = torch.log_softmax(z, dim=-1)
    return log_p.exp().mul_(log_p).nan_to_num_(nan=0.0).sum(dim=-1).neg_()
