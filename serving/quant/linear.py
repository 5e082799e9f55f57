"""The quantized linear layer: the model's q/k/v, o, gate/up and down projections when the
checkpoint stores them quantized."""

import torch
from torch import nn

from counterpoint.serving.quant.matmul import choose_matmul
from counterpoint.serving.quant.weight import QuantizedWeight, can_stack, concat_rows

class QuantLinear(nn.Module):
    """y = x·Wᵀ + b with W held by one or more matmul modules, one per stacked part when the parts
    (q, k and v, say) cannot share one (different act-order permutations, bitsandbytes blocks)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.parts = nn.ModuleList()
        self.kind = ""

    def install(self, weights: list, dtype: torch.dtype, device: torch.device, triton: bool = False) -> str:
        """Build the matmuls for the weights of the stacked parts, in order; returns what runs them
        (and why, for a fallback)."""
        rows = sum(w.shape[0] for w in weights)
        if rows != self.out_features or any(w.shape[1] != self.in_features for w in weights):
            raise ValueError(f"quantized parts {[tuple(w.shape) for w in weights]} do not make a "
                             f"({self.out_features}, {self.in_features}) weight")
        if all(isinstance(w, QuantizedWeight) for w in weights) and can_stack(weights):
            weights = [concat_rows(weights)]
        kinds = []
        for weight in weights:
            if isinstance(weight, QuantizedWeight):
                cls, reason = choose_matmul(weight, dtype, device, triton)
                self.parts.append(cls(weight, dtype, device))
                kinds.append(cls.name + (f" ({reason})" if reason else ""))
            else:
                self.parts.append(weight.on(device))
                kinds.append(weight.name)
        self.kind = "; ".join(sorted(set(kinds)))
        return self.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            y = self.parts[0](x)
        else:
            y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"
