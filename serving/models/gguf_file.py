"""A GGUF file as the engine reads it: its metadata as a Hugging Face config and tokenizer
directory (written once, into the cache), and its tensors under Hugging Face names.

The config, tokenizer and chat template come from the metadata through transformers' GGUF
mapping. llama.cpp stores each Q/K head's rotary halves interleaved: `unpermute_rotary` restores
the Hugging Face row order, on float weights and on quantized codes and scales alike (it moves
whole rows).
"""

import hashlib
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from counterpoint.serving.cache import cache_dir

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


def rotary_heads(name: str, config) -> int | None:
    """Heads whose rows llama.cpp interleaved in this tensor (Llama's Q and K), else None."""
    if config.model_type != "llama":
        return None
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def unpermute_rotary(weight, num_heads: int):
    """Undo llama.cpp's reordering of Q/K rows (numpy arrays or torch tensors, rows first)."""
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # rows first; quantized types as rows of raw block bytes (as the gguf package gives them)


# GGUF metadata value types -> bytes, for the fixed-size ones (8: string, 9: array)
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        size = self.unpack("Q")
        self.pos += size
        return bytes(self.buffer[self.pos - size : self.pos]).decode()

    def value(self, kind: int):
        """Read a value of this type; arrays are skipped (None): the engine needs none of them."""
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.unpack("IQ")
            if item in VALUE_SIZES:
                self.pos += count * VALUE_SIZES[item]
            else:
                for _ in range(count):
                    self.value(item)
            return None
        fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[kind]
        return self.unpack(fmt)


def read_gguf(gguf_file: Path) -> tuple[dict, list[GGUFTensor]]:
    """The scalar metadata and the tensors (memory-mapped) of a GGUF v2/v3 file. The gguf
    package's reader takes seconds on a 49k-token vocabulary: this one skips the arrays."""
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    mapped = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    magic, version, num_tensors, num_fields = cursor.unpack("4sIQQ")
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"{gguf_file} is not a GGUF file of version 2 or later")
    fields = {}
    for _ in range(num_fields):
        key = cursor.string()
        fields[key] = cursor.value(cursor.unpack("I"))
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
        infos.append((name, dims, GGMLQuantizationType(cursor.unpack("I")), cursor.unpack("Q")))
    alignment = fields.get("general.alignment") or 32
    start = -(-cursor.pos // alignment) * alignment
    return fields, [_tensor(mapped, start, *info) for info in infos]


def _tensor(mapped: np.memmap, start: int, name: str, dims: list[int], kind: GGMLQuantizationType,
            offset: int) -> GGUFTensor:
    block, block_bytes = GGML_QUANT_SIZES[kind]
    shape = list(reversed(dims))
    row_bytes = dims[0] // block * block_bytes
    data = mapped[start + offset : start + offset + math.prod(shape[:-1]) * row_bytes]
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = data.view(np.float32 if kind == GGMLQuantizationType.F32 else np.float16).reshape(shape)
    else:
        data = data.reshape(*shape[:-1], row_bytes)
    return GGUFTensor(name, kind, data)


def open_gguf(gguf_file: Path) -> list[GGUFTensor]:
    """The tensors of a GGUF file whose architecture the engine supports."""
    fields, tensors = read_gguf(gguf_file)
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return tensors


def write_metadata(gguf_file: Path, out: Path) -> None:
    """config.json, the tokenizer and generation_config.json of the GGUF file into `out`."""
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {config.model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    config.dtype = "bfloat16"
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=getattr(config, "pad_token_id", None)).save_pretrained(out)


def metadata_dir(gguf_file: Path) -> Path:
    """The GGUF file's config and tokenizer as a directory, made once per file (by path, size and
    modification time) under the cache."""
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    gguf_file = gguf_file.resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"
    if not (out / "config.json").is_file():
        # NOTE: written aside and renamed, so a concurrent or interrupted build never leaves half a directory
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        write_metadata(gguf_file, tmp)
        if out.exists():
            shutil.rmtree(tmp)
        else:
            tmp.replace(out)
    return out


def config_dir(path: str | Path) -> Path:
    """Where a model's config and tokenizer live: the directory itself, or a GGUF file's metadata."""
    path = Path(path)
    return metadata_dir(path) if path.suffix == ".gguf" else path
