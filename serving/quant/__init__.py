"""Quantized weights: the format registry, the format-neutral weight and the quantized linear layer."""

from counterpoint.serving.quant import gptq  # noqa: F401  (registers the format)
from counterpoint.serving.quant.base import FORMATS, WeightFormat, weight_format

__all__ = ["FORMATS", "WeightFormat", "weight_format"]
