"""Linear layers on the CPU through oneDNN, with each weight reordered once at load.

torch's plain `F.linear` hands a batch of more than one row to a GEMM that repacks the whole weight
on every call, and on CPUs without native bfloat16 it emulates bfloat16 products. oneDNN's linear
takes a weight already laid out in its blocked format, the way IPEX and vLLM's CPU backend load
theirs: that is what `PackedLinear` holds. On CPUs that lack bfloat16 instructions (AVX2 only),
bfloat16 layers keep a float32 copy and compute in float32; their inputs and outputs stay bfloat16.

A few rows (a decode step) read every weight once and little else, and there a plain row-major
bfloat16 weight does better: up to cpu_gemv.max_rows() rows go through cpu_gemv.py's C loop.
- With AVX-512 BF16, bfloat16 layers hold that weight alone: more rows go through F.linear
  (oneDNN with a reorder per call, within 3% of a packed weight from 256 rows, measured).
- With AVX2 alone, they hold both: more rows go through the packed float32 copy.
- Without the C loop (no compiler, or neither instruction set), one row reads the bfloat16 weight
  through F.linear where bfloat16 computes in float32, and more rows the packed copy.
"""

import functools
import weakref

import torch
from torch import nn
import torch.nn.functional as F

from counterpoint.serving.models import cpu_gemv

# NOTE: the reorder takes a batch-size hint; 128 was as fast as 1 or 8 from 1 to 333 rows (measured).
PACK_HINT = 128
_PACKABLE = (torch.float32, torch.bfloat16)


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT)


@functools.cache
def native_bfloat16() -> bool:
    """Whether oneDNN has a bfloat16 linear on this CPU (AVX-512 BW+VL+DQ or AVX-NE-CONVERT:
    what its reorder asks for), tried once."""
    try:
        _reorder(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def compute_dtype(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.dtype:
    """The dtype products of `dtype` tensors run in: float32 for bfloat16 on a CPU without
    bfloat16 instructions, where emulated bfloat16 products are 2-8x slower (measured), else `dtype`."""
    if device.type != "cpu" or dtype != torch.bfloat16 or native_bfloat16():
        return dtype
    return torch.float32


class PackedLinear(nn.Module):
    """An `nn.Linear` for inference on the CPU: its weight in oneDNN's blocked layout or, where
    cpu_gemv's loop runs, row-major (see the module's docstring)."""

    def __init__(self, linear: nn.Linear, c_loop: bool = True):
        """c_loop=False: oneDNN's packed weight even where cpu_gemv's loop could run (a benchmark's baseline)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype(linear.weight.dtype)
        self.gemv = c_loop and cpu_gemv.supports(linear)
        native = self.compute_dtype == linear.weight.dtype
        # NOTE: buffers, so that counting the model's weights counts these
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        if not (self.gemv and native):
            self.packed = _reorder(linear.weight.detach().to(self.compute_dtype))
            self.bias = None if linear.bias is None else linear.bias.detach().to(self.compute_dtype)
        # NOTE: one row reads every weight once, so there half the bytes beat float32 products (measured)
        self.few_rows = cpu_gemv.max_rows() if self.gemv else int(not native)
        if self.few_rows:
            self.register_buffer("row_weight", linear.weight.detach(), persistent=False)
            self.register_buffer("row_bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def takes_c_loop(self, x: torch.Tensor) -> bool:
        """Whether x's rows go through cpu_gemv's C loop."""
        return self.gemv and 0 < x.shape[0] <= self.few_rows and not torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_c_loop(x):
            return cpu_gemv.linear(x, self.row_weight)
        if self.packed is None or 0 < x.shape[0] <= self.few_rows:
            return F.linear(x, self.row_weight, self.row_bias)
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.compute_dtype).contiguous(), self.packed, self.bias,
                                                 "none", [], "")
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute_dtype}"


def pack_linears(model: nn.Module) -> int:
    """Swaps every float `nn.Linear` of a CPU model (lm_head included) for a `PackedLinear`; returns
    how many. Quantized layers are other modules and stay as they are. A layer held by several
    models (shared ends, see engine/trunks.py) gets one PackedLinear, whichever model is packed first."""
    count = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and child.weight.dtype in _PACKABLE and child.weight.device.type == "cpu":
                if child not in _PACKED:
                    _PACKED[child] = PackedLinear(child)
                    count += 1
                setattr(module, name, _PACKED[child])
    return count


_PACKED: "weakref.WeakKeyDictionary[nn.Linear, PackedLinear]" = weakref.WeakKeyDictionary()
