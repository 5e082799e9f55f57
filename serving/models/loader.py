"""Load a Llama-family model from a local Hugging Face directory (config.json + safetensors)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig

from counterpoint.serving.models.gguf_file import config_dir, hf_tensor_name, metadata_dir, open_gguf
from counterpoint.serving.models.llama import LlamaForCausalLM
from counterpoint.serving.models.shape import LlamaShape
from counterpoint.serving.models.weights import load_weights
from counterpoint.serving.quant import weight_format
from counterpoint.serving.quant.gguf import gguf_format, gguf_tensors
from counterpoint.serving.quant.loading import QuantizedLayers
from counterpoint.serving.quant.on_load import METHODS as ON_LOAD
from counterpoint.serving.quant.on_load import quantize_on_load

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str | Path):
    """A model's config: from its directory, or from a GGUF file's metadata."""
    path = config_dir(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: config.json not found")
    return AutoConfig.from_pretrained(path)


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype, except float16 on the CPU, which runs in float32, and
    quantized checkpoints on the CPU, which run in bfloat16 (the only activations the CPU's int4
    and int8 kernels are fast with)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    if device.type == "cpu" and getattr(hf_config, "quantization_config", None):
        return torch.bfloat16
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def tensor_names(files: list[Path]) -> list[tuple[Path, str]]:
    names = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names += [(file, key) for key in f.keys()]
    return names


def iter_tensors(files: list[Path], show_progress: bool):
    names = tensor_names(files)
    handles = {}
    try:
        for file, key in tqdm(names, desc="loading weights", disable=not show_progress, leave=False):
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            yield key, handles[file].get_tensor(key)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               show_progress: bool = False, quantization: str = "none", triton: bool = False) -> LlamaForCausalLM:
    """A Hugging Face directory (float, GPTQ or bitsandbytes weights) or a GGUF file;
    `quantization` bnb-nf4 / bnb-int8 quantizes a float checkpoint as it loads; `triton`: quantized
    layers run the Triton kernel (the model will run on the Triton path)."""
    path = Path(path)
    if quantization == "gguf" and path.suffix != ".gguf":
        raise ValueError(f"quantization 'gguf' serves .gguf files; {path} is not one")
    if path.suffix == ".gguf":
        stored = open_gguf(path)
        hf_config = read_hf_config(metadata_dir(path))
        fmt = gguf_format(stored)
        names = [hf_tensor_name(t.name) for t in stored]
        tensors = tqdm(gguf_tensors(stored, hf_config), total=len(names), desc="loading weights",
                       disable=not show_progress, leave=False)
    else:
        hf_config = read_hf_config(path)
        files = safetensors_files(path)
        fmt = weight_format(getattr(hf_config, "quantization_config", None))
        names = [name for _, name in tensor_names(files)] if fmt else []
        tensors = iter_tensors(files, show_progress)
    if fmt and quantization in ON_LOAD:
        raise ValueError(f"quantization {quantization!r} quantizes float checkpoints; {path} is already "
                         f"quantized ({fmt.describe()})")
    model = _build(LlamaShape.from_hf(hf_config), fmt and QuantizedLayers(fmt, names), tensors, dtype, device,
                   max_positions, triton)
    if quantization in ON_LOAD:
        quantize_on_load(model, quantization, dtype, device, triton)
    return model


def _build(shape: LlamaShape, quantized: QuantizedLayers | None, tensors, dtype: torch.dtype, device: torch.device,
           max_positions: int, triton: bool) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(shape, max_positions)
        if quantized:
            quantized.swap_linears(model)
    model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    model.tie_weights()
    if quantized:
        tensors = ((name, t) for name, t in tensors if not quantized.take(name, t))
    load_weights(model, tensors)
    if quantized:
        quantized.install(model, dtype, device, triton)
    model.init_rope(max_positions)
    return model
