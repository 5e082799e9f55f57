"""GGUF tensors served as they are stored: Q4_0 and Q4_1 as 4-bit weights, Q8_0 as 8-bit ones,
with ggml's blocks of 32 weights as the groups. Every other tensor type, and every tensor that is
not a decoder linear layer (embeddings, norms), is dequantized by the `gguf` package.

ggml's blocks, per 32 weights of a row: Q4_0 is a float16 scale d and 16 bytes of 4-bit codes,
w = d·(q − 8); Q4_1 adds a float16 minimum m, w = d·q + m; Q8_0 is d and 32 int8 values,
w = d·q. Code j of a 4-bit block is the low nibble of byte j for j < 16, the high nibble of
byte j − 16 otherwise.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType, dequantize

from counterpoint.serving.models.gguf_file import GGUFTensor, hf_tensor_name, rotary_heads, unpermute_rotary
from counterpoint.serving.quant.base import WeightFormat, register
from counterpoint.serving.quant.weight import QuantizedWeight

BLOCK = 32
QUANTIZED_TYPES = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q8_0: 8}
LINEAR_PARTS = ("_proj.weight",)


def _half(raw: np.ndarray) -> torch.Tensor:
    """(..., 2) bytes -> float32 values of the float16 they hold."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def decode_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight:
    """A quantized GGUF matrix (rows of raw block bytes) -> codes, scales and offsets per block."""
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20,
                                     GGMLQuantizationType.Q8_0: 34}[qtype])
    scale = _half(blocks[..., 0:2])
    if qtype == GGMLQuantizationType.Q8_0:
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128)
        offset = -128 * scale
    else:
        packed = torch.from_numpy(np.ascontiguousarray(blocks[..., -16:]).astype(np.uint8))
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1)
        offset = _half(blocks[..., 2:4]) if qtype == GGMLQuantizationType.Q4_1 else -8 * scale
    return QuantizedWeight(codes.reshape(rows, -1).to(torch.uint8), scale, offset, QUANTIZED_TYPES[qtype], BLOCK)


def permute_rows(weight: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    return QuantizedWeight(unpermute_rotary(weight.q, num_heads), unpermute_rotary(weight.scale, num_heads),
                           unpermute_rotary(weight.offset, num_heads), weight.bits, weight.group_size)


def gguf_tensors(tensors: list[GGUFTensor], config):
    """(HF name, tensor) for float tensors and (HF name, QuantizedWeight) for the quantized linear
    layers, in file order."""
    for t in tensors:
        name = hf_tensor_name(t.name)
        heads = rotary_heads(t.name, config)
        if t.tensor_type in QUANTIZED_TYPES and name.endswith(LINEAR_PARTS):
            weight = decode_blocks(t.data, t.tensor_type)
            yield name, permute_rows(weight, heads) if heads else weight
        else:
            array = dequantize(t.data, t.tensor_type)
            yield name, torch.from_numpy(np.array(unpermute_rotary(array, heads) if heads else array))


def gguf_format(tensors: list[GGUFTensor]) -> "GGUFFormat":
    modules = [hf_tensor_name(t.name).removesuffix(".weight") for t in tensors
               if t.tensor_type in QUANTIZED_TYPES and hf_tensor_name(t.name).endswith(LINEAR_PARTS)]
    types = sorted({t.tensor_type.name for t in tensors if t.tensor_type in QUANTIZED_TYPES})
    return GGUFFormat({"quant_method": "gguf", "modules": modules, "types": types})


@register
class GGUFFormat(WeightFormat):
    """The quantized linear layers of a GGUF file, already decoded by `gguf_tensors`."""

    name = "gguf"
    required = ("weight",)

    def quantized_modules(self, tensor_names) -> set[str]:
        return set(self.config["modules"])

    def read(self, module: str, tensors: dict) -> QuantizedWeight:
        return tensors["weight"]

    def describe(self) -> str:
        return f"GGUF {'/'.join(self.config['types'])}"
