"""GPTQ checkpoints written from the format's definition, independently of the code under test.

Round-to-nearest codes (not GPTQ's error feedback: the layout is what is tested here), packed as
AutoGPTQ packs them: 32 / bits codes per int32, the first code in the lowest bits, qweight along
the input dimension and qzeros along the output one; the `gptq` (v1) format stores zero − 1.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes -> (rows * bits / 32, cols) int32, packed along rows."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = torch.zeros(rows // per_word, cols, dtype=torch.int64)
    for i in range(per_word):
        words |= (codes[i::per_word].long() & ((1 << bits) - 1)) << (bits * i)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # two's complement


def group_index(k: int, group_size: int, act_order: bool, gen: torch.Generator) -> torch.Tensor:
    g_idx = torch.arange(k) // (k if group_size == -1 else group_size)  # the last group may be shorter
    return g_idx[torch.randperm(k, generator=gen)] if act_order else g_idx


def quantize_layer(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool,
                   checkpoint_format: str, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """(N, K) float weight -> (GPTQ tensors, the weight they encode: W[n,k] = (q − z)·s)."""
    n, k = w.shape
    g_idx = group_index(k, group_size, act_order, gen)
    groups = int(g_idx.max()) + 1
    top = 2**bits - 1
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            scales[g] = (torch.maximum(-lo, hi) * 2 / top).clamp(min=1e-8)
            zeros[g] = (top + 1) // 2
        else:
            scales[g] = ((hi - lo) / top).clamp(min=1e-8)
            zeros[g] = torch.round(-lo / scales[g]).long().clamp(1, top)  # v1 cannot store z = 0
    scales = scales.half().float()
    q = torch.clamp(torch.round(w / scales[g_idx].T) + zeros[g_idx].T, 0, top).long()
    dequant = (q - zeros[g_idx].T) * scales[g_idx].T
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    tensors = {"qweight": pack(q.T, bits), "qzeros": pack(stored_zeros.T, bits).T.contiguous(),
               "scales": scales.half(), "g_idx": g_idx.int()}
    return tensors, dequant


def write_gptq(float_dir: Path, out: Path, dequant_out: Path, bits: int = 4, group_size: int = 32,
               sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq", seed: int = 0) -> Path:
    """Quantize every decoder linear layer of the float checkpoint: `out` holds the GPTQ checkpoint,
    `dequant_out` the same model with the encoded weights as plain floats (for transformers)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(float_dir / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rsplit(".", 1)[-1] in LINEARS:
            layer, w = quantize_layer(t.float(), bits, group_size, sym, desc_act, checkpoint_format, gen)
            quantized.update({f"{module}.{key}": value for key, value in layer.items()})
            dequantized[name] = w.to(t.dtype)
        else:
            quantized[name] = dequantized[name] = t
    for target, data in ((out, quantized), (dequant_out, dequantized)):
        shutil.copytree(float_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file({k: v.contiguous() for k, v in data.items()}, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                     "desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
