"""Quantized weights: the format registry, the format-neutral weight and the quantized linear layer."""

from counterpoint.serving.quant import bnb, gguf, gptq  # noqa: F401  (each registers its format)
from counterpoint.serving.quant.base import FORMATS, WeightFormat, weight_format

__all__ = ["FORMATS", "WeightFormat", "weight_format"]
