"""Per-request decoding: parameters, stream combination, logits processing, token selection."""

from counterpoint.decoding.params import ContextContrastParams, ContrastiveParams, SamplingParams

__all__ = ["SamplingParams", "ContrastiveParams", "ContextContrastParams"]
