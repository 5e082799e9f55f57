"""Contrastive decoding, expert against amateur (Li et al. 2023, "Contrastive Decoding: Open-ended
Text Generation as Optimization"): c = log p_E − β·log p_A,τ on the expert's plausibility head
V_head = {v : z_E(v) ≥ max z_E + ln α}, −inf elsewhere.
"""

import math
from collections.abc import Callable

import torch

from counterpoint.decoding.combine.base import Combined, register, row_values
from counterpoint.decoding.params import ContrastiveParams
from counterpoint.decoding.processing import safe_divisor

PAD_SCORE = -1.0e4  # score of tokens added to a too-small head so beam search has enough candidates
# Amateur log-probabilities below this are 0 in float32 anyway; the floor keeps an extreme τ finite.
LOG_FLOOR = -1.0e4


# A fused implementation of `dense` per device type, registered by the server (its C loop on the CPU):
# fn(z_e, z_a, alpha, beta, tau) with dense's arguments and result up to float32 rounding, or None
# where it cannot take those tensors.
FUSED: dict[str, Callable[..., torch.Tensor | None]] = {}


@register("contrastive")
def contrastive(z_e: torch.Tensor, z_a: torch.Tensor, params: list[ContrastiveParams],
                min_candidates: list[int]) -> Combined:
    """(R, V) expert and amateur logits -> combined logits, one row per hypothesis.

    min_candidates[i] is the beam width of row i (1 outside beam search): a head smaller than that
    is padded with the next expert tokens at PAD_SCORE.
    """
    alpha, beta = row_values(params, "alpha", z_e.device), row_values(params, "beta", z_e.device)
    tau = safe_divisor(row_values(params, "amateur_temperature", z_e.device))
    fused = FUSED.get(z_e.device.type)
    combined = fused(z_e, z_a, alpha, beta, tau) if fused else None
    if combined is None:
        combined = dense(z_e.float(), z_a.float(), alpha, beta, tau)
    if max(min_candidates) > 1:
        z_e = z_e.float()
        combined = _pad_head(combined, z_e, z_e >= z_e.amax(dim=-1, keepdim=True) + torch.log(alpha), min_candidates)
    return Combined(combined)


def dense(z_e: torch.Tensor, z_a: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
          tau: torch.Tensor) -> torch.Tensor:
    """(R, V) float32 logits and (R, 1) α, β, τ -> (R, V) float32 c on the head, −inf elsewhere."""
    # NOTE: each full-size temporary costs the CPU fresh pages, so the result is built in place in two
    # buffers: log p_E becomes the combined logits, the amateur's shifted logits its log p_A,τ.
    combined = torch.log_softmax(z_e, dim=-1)
    # Shifted before dividing, so a tiny τ cannot overflow the amateur's logits to inf (NaN).
    log_p_a = torch.log_softmax((z_a - z_a.amax(dim=-1, keepdim=True)).div_(tau), dim=-1).clamp_(min=LOG_FLOOR)
    # Both terms finite, so no inf − inf before masking (an extreme β's +inf is clamped in processing).
    combined.sub_(log_p_a.mul_(beta))
    head = z_e >= z_e.amax(dim=-1, keepdim=True) + torch.log(alpha)
    return combined.masked_fill_(~head, -math.inf)


def _pad_head(combined: torch.Tensor, z_e: torch.Tensor, head: torch.Tensor, widths: list[int]) -> torch.Tensor:
    need = torch.tensor(widths, device=z_e.device)
    size = head.sum(dim=-1)
    if bool((size >= need).all()):
        return combined
    order = z_e.argsort(dim=-1, descending=True)
    rank = torch.arange(z_e.shape[-1], device=z_e.device)[None, :]
    # The expert's best tokens outside the head, up to `need` in all, join it at PAD_SCORE.
    pad_sorted = (rank < need[:, None]) & ~head.gather(1, order)
    pad = torch.zeros_like(head).scatter(1, order, pad_sorted)
    return combined.masked_fill(pad, PAD_SCORE)
