"""A decode step's decoder layers in one C call on the CPU (cpu_step.c, built with the kernels it
strings together by serving/native.py).

At a few decoding sequences a layer's kernels take tens of microseconds each, and the Python and
torch code around them (views, splits, rotary, the cache write, the softmax, silu, some 15 ops and
8 C calls a layer) as long again. `DecodeLayers` runs a model's layers for a step of decodes alone
in one call, with the rounding points of the torch path. It applies to bfloat16 Llama layers
without biases or q/k norms whose linear layers take cpu_gemv's C loop, with the C attention
kernel's cache; other steps (any prefill, more rows than the C loop takes) run layer by layer.
"""

import ctypes
import functools
from pathlib import Path

import torch

from counterpoint.serving import native
from counterpoint.serving.attention import cpu_kernel
from counterpoint.serving.models import cpu_gemv, cpu_norm
from counterpoint.serving.models.cpu_linear import PackedLinear
from counterpoint.serving.native import LANES

SOURCES = (Path(__file__).with_name("cpu_step.c"), cpu_gemv.SOURCE, cpu_norm.SOURCE, cpu_kernel.SOURCE)


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")]


class StepShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("rows", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                                     "intermediate", "num_blocks", "block_size", "table_stride",
                                                     "max_len", "layer_bytes")] + [("eps", ctypes.c_float),
                                                                                   ("scale", ctypes.c_float)]


@functools.cache
def _decode_layers():
    lib = native.load(*SOURCES)
    if lib is None:
        return None
    fn = lib.decode_layers
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 9, None
    return fn


def supports(model) -> bool:
    """A bfloat16 Llama whose layers have no biases or q/k norms, every linear layer taking the C loop."""
    s = model.shape
    linears = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    return (not (s.qkv_bias or s.o_bias or s.qk_norm) and model.embed_tokens.weight.dtype == torch.bfloat16
            and all(isinstance(m, PackedLinear) and m.gemv for m in linears)
            and s.hidden_size % LANES == 0 and s.head_dim % LANES == 0 and s.intermediate_size % LANES == 0
            and _decode_layers() is not None)


class DecodeLayers:
    """A model's decoder layers for steps of decodes alone, through cpu_step.c."""

    def __init__(self, model):
        self.model = model
        self.layers = (Layer * len(model.layers))(*[
            Layer(*(t.data_ptr() for t in (layer.input_layernorm.weight, layer.self_attn.qkv_proj.row_weight,
                                           layer.self_attn.o_proj.row_weight, layer.post_attention_layernorm.weight,
                                           layer.mlp.gate_up_proj.row_weight, layer.mlp.down_proj.row_weight)))
            for layer in model.layers
        ])

    def takes(self, x: torch.Tensor, ctx) -> bool:
        """Whether this step's rows (x) go through the C call: decodes alone, through the C attention
        kernel, at most as many as the C loop takes."""
        paged = getattr(ctx, "paged", None)
        return (paged is not None and ctx.meta.num_decodes == x.shape[0] <= cpu_gemv.max_rows()
                and ctx.cache.data.dtype == torch.bfloat16 and not torch.is_grad_enabled())

    @staticmethod
    def stream(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) as fresh contiguous tensors the call may update, a missing residual as zeros
        (adding it changes nothing)."""
        return x.clone(memory_format=torch.contiguous_format), (
            torch.zeros_like(x) if residual is None else residual.clone(memory_format=torch.contiguous_format))

    def run(self, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, ctx, start: int, stop: int):
        """Layers start..stop-1 over (x, residual), in place (see `stream`)."""
        s, paged, cache = self.model.shape, ctx.paged, ctx.cache
        kv = cache.layer(start)
        shape = StepShape(x.shape[0], s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size,
                          kv.shape[2], kv.shape[3], paged.tables.stride(0), paged.max_len,
                          cache.data.stride(0) * cache.data.element_size(), s.rms_norm_eps, paged.scale.value)
        _decode_layers()(ctypes.addressof(self.layers) + start * ctypes.sizeof(Layer), stop - start,
                         ctypes.addressof(shape), kv.data_ptr(), x.data_ptr(), residual.data_ptr(),
                         positions.data_ptr(), self.model.cos_sin.data_ptr(), ctx.meta.slot_mapping.data_ptr(),
                         paged.tables.data_ptr(), paged.lens.data_ptr())
