"""`import-gguf`: a GGUF file to a Hugging Face directory.

Tensors are read and dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and
the other types it knows); the config, tokenizer and chat template come from the GGUF metadata
through transformers' GGUF mapping.
"""

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from counterpoint.serving.models.loader import DTYPES
from counterpoint.training.checkpoint import save_tensors, write_provenance

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(name: str) -> str:
    """GGUF's `blk.N.attn_q.weight` -> HF's `model.layers.N.self_attn.q_proj.weight`."""
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if block:
        layer, part, kind = block.groups()
        if part in IN_BLOCK:
            return f"model.layers.{layer}.{IN_BLOCK[part]}.{kind}"
    else:
        top, _, kind = name.rpartition(".")
        if top in TOP_LEVEL:
            return f"{TOP_LEVEL[top]}.{kind}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (it interleaves each head's rotary halves)."""
    head_dim_half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def read_tensors(reader: GGUFReader, config, dtype: torch.dtype, show_progress: bool) -> dict[str, torch.Tensor]:
    permute = config.model_type == "llama"
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantizing", disable=not show_progress, leave=False):
        weight = dequantize(t.data, t.tensor_type)
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            weight = unpermute_rotary(weight, heads)
        # copy: the reader's buffer is read-only
        tensors[hf_tensor_name(t.name)] = torch.from_numpy(np.array(weight)).to(dtype)
    return tensors


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16", show_progress: bool = True) -> Path:
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    reader = GGUFReader(gguf_file)
    arch = reader.fields["general.architecture"].contents()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config.dtype = dtype
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    tensors = read_tensors(reader, config, DTYPES[dtype], show_progress)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out)
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=getattr(config, "pad_token_id", None)).save_pretrained(out)
    write_provenance(out, "import-gguf", [gguf_file], dtype=dtype, architecture=arch, num_tensors=len(tensors))
    return out
