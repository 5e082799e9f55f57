"""bitsandbytes checkpoints, in the layout transformers writes, and quantize-on-load.

4-bit (nf4 or fp4, Dettmers et al. 2023, with or without double quantization): per layer the
packed codes `weight` and its quant state (`weight.absmax`, `weight.quant_map`, for double quant
`weight.nested_absmax` and `weight.nested_quant_map`, and `weight.quant_state.bitsandbytes__nf4`,
the state's JSON). These run through bitsandbytes' own `matmul_4bit`.

8-bit (LLM.int8, Dettmers et al. 2022): `weight` int8 (N, K) and `SCB` (N,), W = weight·SCB/127.
That is one scale per row, so it runs on the same int8 kernel as GPTQ's 8-bit weights: a
weight-only matmul, without LLM.int8's activation quantization and outlier split.
"""

import torch
from torch import nn

from counterpoint.serving.quant.base import WeightFormat, register
from counterpoint.serving.quant.weight import QuantizedWeight

class Bnb4bit(nn.Module):
    """A bitsandbytes 4-bit weight and its quant state, run by bitsandbytes."""

    def __init__(self, packed: torch.Tensor, quant_state):
        super().__init__()
        self.register_buffer("packed", packed)
        self.quant_state = quant_state
        self.name = f"bitsandbytes {quant_state.quant_type}{' (double quant)' if quant_state.nested else ''}"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quant_state.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.quant_state)

    def on(self, device: torch.device) -> "Bnb4bit":
        self.quant_state.to(device)  # NOTE: not a tensor, so Module.to would leave it behind
        return self.to(device)


def int8_rows(codes: torch.Tensor, row_absmax: torch.Tensor) -> QuantizedWeight:
    """LLM.int8's int8 codes and per-row absmax -> W = codes·absmax/127."""
    scale = (row_absmax.float() / 127)[:, None]
    return QuantizedWeight((codes.to(torch.int16) + 128).to(torch.uint8), scale, -128 * scale, 8, codes.shape[1])


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4") -> Bnb4bit:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight, quant_type=quant_type, blocksize=64)
    return Bnb4bit(packed, state)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    import bitsandbytes.functional as F

    # NOTE: from float16, as bitsandbytes' Int8Params quantizes, so the codes match transformers'
    codes, absmax, _ = F.int8_vectorwise_quant(weight.half())
    return int8_rows(codes, absmax)


@register
class BitsAndBytesFormat(WeightFormat):
    name = "bitsandbytes"

    def __init__(self, config: dict):
        super().__init__(config)
        self.four_bit = bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))
        if not self.four_bit and not (config.get("load_in_8bit") or config.get("_load_in_8bit")):
            raise ValueError("quantization_config for bitsandbytes must set load_in_4bit or load_in_8bit")
        self.required = ("weight", "weight.absmax", "weight.quant_map") if self.four_bit else ("weight", "SCB")

    def quantized_modules(self, tensor_names) -> set[str]:
        marker = ".weight.absmax" if self.four_bit else ".SCB"
        return {name.removesuffix(marker) for name in tensor_names if name.endswith(marker)}

    def read(self, module: str, tensors: dict[str, torch.Tensor]):
        if not self.four_bit:
            return int8_rows(tensors["weight"], tensors["SCB"])
        from bitsandbytes.functional import QuantState

        state = {key.removeprefix("weight."): value for key, value in tensors.items() if key != "weight"}
        try:
            quant_state = QuantState.from_dict(state, device=torch.device("cpu"))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{module}: bitsandbytes cannot read its 4-bit quant state: {e}") from None
        return Bnb4bit(tensors["weight"], quant_state)

    def describe(self) -> str:
        if not self.four_bit:
            return "bitsandbytes int8"
        return f"bitsandbytes {self.config.get('bnb_4bit_quant_type', 'fp4')}"
