"""Quantize-on-load (`--quantization bnb-nf4|bnb-int8`): a float checkpoint's decoder linear
layers quantized by bitsandbytes as the model loads; embeddings, norms and lm_head stay float,
as transformers' bitsandbytes integration leaves them."""

import logging

import torch
from torch import nn

from counterpoint.serving.quant.bnb import quantize_4bit, quantize_int8
from counterpoint.serving.quant.linear import QuantLinear

log = logging.getLogger("counterpoint")
METHODS = ("bnb-nf4", "bnb-int8")
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@torch.no_grad()
def quantize_on_load(model: nn.Module, method: str, dtype: torch.dtype, device: torch.device, triton: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)} for a float checkpoint; got {method!r}")
    kinds = set()
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                linear = getattr(parent, name, None)
                if linear is None:
                    continue
                weight = linear.weight.detach()
                quantized = quantize_4bit(weight) if method == "bnb-nf4" else quantize_int8(weight)
                module = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None)
                if linear.bias is not None:
                    module.bias = linear.bias
                kinds.add(module.install([quantized], dtype, device, triton))
                setattr(parent, name, module)
    log.info("%s: the decoder's linear layers run as %s", method, "; ".join(sorted(kinds)))
