"""GPTQ checkpoints (Frantar et al. 2023) in the layout AutoGPTQ, GPTQModel and transformers write.

Per linear layer of N outputs and K inputs, with p = 32 / bits codes per int32:
- `qweight` int32 (K / p, N): code of input k, output n in bits [bits·(k % p), bits·(k % p + 1)) of
  qweight[k // p, n];
- `qzeros` int32 (groups, N / p): zero points packed the same way along n; the `gptq` (v1) format
  stores z − 1, `gptq_v2` stores z;
- `scales` (groups, N); `g_idx` int32 (K,): the group of each input (act-order permutes it);
- W[n, k] = (q[n, k] − z[g, n]) · s[g, n] with g = g_idx[k].
"""

import torch

from counterpoint.serving.quant.base import WeightFormat, register
from counterpoint.serving.quant.weight import QuantizedWeight, from_group_index

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32 / bits codes each -> the codes (int64), unpacked along `dim`."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # as unsigned
    codes = (words.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)]))
    codes = codes & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return codes.reshape(shape)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of unpack_int32: codes (0 <= c < 2^bits) -> int32 words along `dim`."""
    per_word = 32 // bits
    codes = codes.to(torch.int64).movedim(dim, 0)
    shape = codes.shape
    codes = codes.reshape(shape[0] // per_word, per_word, *shape[1:])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, per_word, *([1] * (len(shape) - 1)))
    words = (codes << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(0, dim).contiguous()


@register
class GPTQFormat(WeightFormat):
    name = "gptq"
    required = ("qweight", "qzeros", "scales")  # and g_idx, which old checkpoints without act-order omit

    def __init__(self, config: dict):
        super().__init__(config)
        self.bits = int(config.get("bits", 4))
        self.checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config.bits {self.bits} is not supported for GPTQ; supported: "
                             f"{', '.join(map(str, SUPPORTED_BITS))}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format {self.checkpoint_format!r} is not supported; "
                             f"supported: {', '.join(CHECKPOINT_FORMATS)}")
        self.group_size = int(config.get("group_size", 128))
        self.desc_act = bool(config.get("desc_act", False))

    def read(self, module: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        q = unpack_int32(qweight, self.bits, 0).T  # (N, K)
        n, k = q.shape
        zeros = unpack_int32(qzeros, self.bits, 1)
        groups = scales.shape[0]
        if scales.shape != (groups, n) or zeros.shape != (groups, n):
            raise ValueError(f"{module}: qweight {tuple(qweight.shape)} holds a ({n}, {k}) weight, but scales is "
                             f"{tuple(scales.shape)} and qzeros {tuple(qzeros.shape)}; expected ({groups}, {n}) "
                             f"and ({groups}, {n * self.bits // 32}) at {self.bits} bits")
        if self.checkpoint_format == "gptq":
            zeros = zeros + 1
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k) // (k // groups)
        if g_idx.shape != (k,):
            raise ValueError(f"{module}: g_idx has shape {tuple(g_idx.shape)}, expected ({k},)")
        scale = scales.float().T.contiguous()
        offset = -(zeros.float().T * scale)
        try:
            return from_group_index(q.to(torch.uint8), scale, offset.contiguous(), self.bits, g_idx)
        except ValueError as e:
            raise ValueError(f"{module}: {e}") from None

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.checkpoint_format} {self.bits}-bit, {group}{', act-order' if self.desc_act else ''}"
