"""`import-gguf`: a GGUF file to a Hugging Face directory.

Tensors are read by serving/models/gguf_file.py and dequantized with the `gguf` package (F32,
F16, BF16, Q8_0, Q4_0, Q4_1 and the other types it knows); the config, tokenizer and chat
template come from the GGUF metadata through transformers' GGUF mapping.
"""

import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import dequantize
from tqdm import tqdm
from transformers import AutoConfig

from counterpoint.serving.models.gguf_file import (GGUFTensor, hf_tensor_name, metadata_dir, open_gguf,
                                                  rotary_heads, unpermute_rotary)
from counterpoint.serving.models.loader import DTYPES
from counterpoint.training.checkpoint import save_tensors, write_provenance


def read_tensors(stored: list[GGUFTensor], config, dtype: torch.dtype, show_progress: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    for t in tqdm(stored, desc="dequantizing", disable=not show_progress, leave=False):
        weight = dequantize(t.data, t.tensor_type)
        heads = rotary_heads(t.name, config)
        if heads:
            weight = unpermute_rotary(weight, heads)
        # copy: the reader's buffer is read-only
        tensors[hf_tensor_name(t.name)] = torch.from_numpy(np.array(weight)).to(dtype)
    return tensors


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16", show_progress: bool = True) -> Path:
    gguf_file, out = Path(gguf_file), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    stored = open_gguf(gguf_file)
    # NOTE: through the cached metadata directory: reading GGUF metadata takes seconds per pass
    shutil.copytree(metadata_dir(gguf_file), out, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(out)
    config.dtype = dtype
    config.save_pretrained(out)
    tensors = read_tensors(stored, config, DTYPES[dtype], show_progress)
    save_tensors(tensors, out)
    write_provenance(out, "import-gguf", [gguf_file], dtype=dtype, architecture=config.model_type,
                     num_tensors=len(tensors))
    return out
