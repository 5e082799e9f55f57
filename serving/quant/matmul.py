"""The matmuls a quantized weight runs on, and the choice among them per weight, dtype and device.

On the CPU, torch ships weight-only kernels: int4 with groups of 32-256
(`_weight_int4pack_mm_for_cpu`, which computes (q − 8)·s + z per group) and int8 with one scale
per row (`_weight_int8pack_mm`). Both are fast with bfloat16 activations only: with float32 ones
they ran 10-15x slower than a float32 matmul on the same shapes (`counterpoint bench quant` shows
the model-level figures), so a float32 model runs its quantized layers dequantized. Anything the
kernels cannot take runs dequantized too, and says why.
"""

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.serving.quant.weight import QuantizedWeight

INT4_GROUP_SIZES = (256, 128, 64, 32)
KERNEL_DTYPES = (torch.bfloat16,)  # activations the CPU int kernels are fast with


class Dequantized(nn.Module):
    """The weight dequantized once at load: a plain matmul in the model's dtype."""

    name = "dequantized"

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("weight", weight.dequantize(dtype).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _Permuted(nn.Module):
    """Reads the input in the stored column order (act-order) before the matmul."""

    def __init__(self, weight: QuantizedWeight, device: torch.device):
        super().__init__()
        self.register_buffer("perm", None if weight.perm is None else weight.perm.to(device))

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.perm is None else x.index_select(-1, self.perm)


class Int4CPU(_Permuted):
    name = "int4 (torch CPU kernel)"

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        super().__init__(weight, device)
        group = next(g for g in INT4_GROUP_SIZES if weight.group_size % g == 0)
        weight = weight.with_group_size(group)
        self.group_size = group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.int(), 1))
        # the kernel's (q − 8)·s + z: z = offset + 8·s
        zero = weight.offset + 8 * weight.scale
        self.register_buffer("scale_zero", torch.stack([weight.scale.T, zero.T], -1).to(dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(self.permute(x), self.packed, self.group_size,
                                                         self.scale_zero)


class Int8CPU(_Permuted):
    name = "int8 (torch CPU kernel)"

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        super().__init__(weight, device)
        # W = (q − 128)·s + c per row, c = offset + 128·s; c is 0 for symmetric weights
        self.register_buffer("codes", (weight.q.int() - 128).to(torch.int8))
        self.register_buffer("scale", weight.scale[:, 0].to(dtype))
        correction = weight.offset[:, 0] + 128 * weight.scale[:, 0]
        self.register_buffer("correction", correction.to(dtype) if correction.abs().max() > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.permute(x)
        y = torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale)
        if self.correction is not None:
            y = y + x.sum(-1, keepdim=True) * self.correction
        return y


class TritonQuant(_Permuted):
    """kernels/quant_matmul.py: the codes packed along K, dequantized tile by tile on the GPU."""

    name = "Triton int matmul"

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: torch.device):
        super().__init__(weight, device)
        from counterpoint.serving.quant.gptq import pack_int32

        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("qweight", pack_int32(weight.q.T, weight.bits, 0).to(device))
        self.register_buffer("scale", weight.scale.T.contiguous().to(device))
        self.register_buffer("offset", weight.offset.T.contiguous().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from counterpoint.kernels.quant_matmul import quant_matmul

        shape = x.shape
        y = quant_matmul(self.permute(x).reshape(-1, shape[-1]), self.qweight, self.scale, self.offset, self.bits,
                         self.group_size)
        return y.view(*shape[:-1], -1)


def choose_matmul(weight: QuantizedWeight, dtype: torch.dtype, device: torch.device,
                  triton: bool = False) -> tuple[type, str]:
    """The matmul class for this weight, and why when it is the dequantized fallback. `triton`:
    the model runs the Triton kernels (on CUDA, or in Triton's interpreter)."""
    n, k = weight.shape
    if triton or device.type == "cuda":
        if weight.bits in (4, 8) and k % 32 == 0 and weight.group_size % 32 == 0:
            return TritonQuant, ""
        return Dequantized, f"the Triton kernel needs 4 or 8 bits and groups of a multiple of 32; got " \
                            f"{weight.bits} bits, group {weight.group_size}"
    if dtype not in KERNEL_DTYPES:
        return Dequantized, f"the CPU int{weight.bits} kernels are slow with {str(dtype).removeprefix('torch.')} " \
                            "activations (use --dtype bfloat16)"
    if weight.bits == 4:
        if k % 32 or weight.group_size % 32 or n % 16:
            return Dequantized, f"the int4 kernel needs groups of a multiple of 32 and 16 | N; got group " \
                                f"{weight.group_size}, N {n}"
        return Int4CPU, ""
    if weight.bits == 8:
        if weight.group_size != k:
            return Dequantized, "the int8 kernel takes one scale per row, not groups"
        return Int8CPU, ""
    return Dequantized, f"no {weight.bits}-bit kernel"
