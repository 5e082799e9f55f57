"""The driver of every tensor-by-tensor merge (linear, slerp, task arithmetic, TIES, DARE).

Tensors are read lazily, one name at a time from each input model, merged, and appended to the
output shard being filled; a shard is written as soon as it is full. Peak memory is about one
tensor per input model plus one output shard, whatever the models' size.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from counterpoint.serving.models.loader import DTYPES
from counterpoint.training.checkpoint import SHARD_BYTES, write_provenance
from counterpoint.training.merge.base import LazyModel, MergeConfig
from counterpoint.training.merge.parameters import position, resolve


@dataclass
class TensorInputs:
    """One tensor name's inputs: the base model's tensor (or None), the other models' tensors and
    each model's resolved parameters, in config order."""

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    params: list[dict]
    global_params: dict


class ShardWriter:
    """Writes output tensors in shards of at most `shard_bytes` (one tensor may exceed it alone),
    as they come; `close` names the shards and writes the index."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = out, shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes
        self.weight_map[name] = len(self.files)

    def _flush(self) -> None:
        path = self.out / f"shard-{len(self.files)}.partial"
        save_file(self.current, path, metadata={"format": "pt"})
        self.files.append(path)
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0].replace(self.out / "model.safetensors")
            return
        names = [f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i in range(len(self.files))]
        for path, name in zip(self.files, names):
            path.replace(self.out / name)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {tensor: names[i] for tensor, i in self.weight_map.items()}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def merge_tensorwise(config: MergeConfig, out: Path, method: Callable[[TensorInputs], torch.Tensor],
                     needs_base: bool, show_progress: bool, shard_bytes: int = SHARD_BYTES) -> Path:
    if needs_base and config.base_model is None:
        raise ValueError(f"{config.merge_method} needs base_model")
    entries = [e for e in config.models if e.model != config.base_model]
    if not entries:
        raise ValueError(f"{config.merge_method} needs models to merge")
    base = LazyModel(config.base_model) if config.base_model else None
    models = [LazyModel(e.model) for e in entries]
    reference = base or models[0]
    num_layers = AutoConfig.from_pretrained(reference.path).num_hidden_layers
    dtype, out_dtype = DTYPES[config.dtype], DTYPES[config.output_dtype]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, shard_bytes)
    for name in tqdm(reference.names(), desc=config.merge_method, disable=not show_progress):
        tensors = [_read(m, name, dtype) for m in models]
        base_tensor = _read(base, name, dtype) if base else None
        _check_shapes(name, base_tensor, tensors, [e.model for e in entries])
        t = position(name, num_layers)
        params = [{k: resolve(v, name, t) for k, v in {**config.parameters, **e.parameters}.items()}
                  for e in entries]
        top = {k: resolve(v, name, t) for k, v in config.parameters.items()}
        writer.add(name, method(TensorInputs(name, base_tensor, tensors, params, top)).to(out_dtype))
    writer.close()
    _write_metadata(config, reference.path, out)
    write_provenance(out, "merge", [e.model for e in entries] + ([config.base_model] if base else []),
                     seed=config.seed, method=config.merge_method, dtype=config.dtype,
                     out_dtype=config.output_dtype, parameters=config.parameters,
                     model_parameters={str(e.model): e.parameters for e in entries})
    return out


def _read(model: LazyModel, name: str, dtype: torch.dtype) -> torch.Tensor:
    if name not in model.where:
        raise ValueError(f"{model.path} has no tensor {name}")
    return model.get(name).to(dtype)


def _check_shapes(name: str, base: torch.Tensor | None, tensors: list[torch.Tensor], paths: list[Path]) -> None:
    expected = base.shape if base is not None else tensors[0].shape
    for tensor, path in zip(tensors, paths):
        if tensor.shape != expected:
            raise ValueError(f"{name}: {path} has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
                             "(models with different shapes or vocabularies cannot be merged tensor by tensor)")


def _write_metadata(config: MergeConfig, reference: Path, out: Path) -> None:
    hf_config = AutoConfig.from_pretrained(reference)
    hf_config.dtype = config.output_dtype
    hf_config.save_pretrained(out)
    source = config.tokenizer_source
    tokenizer_dir = reference if source in (None, "base") else Path(source)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if (reference / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(reference).save_pretrained(out)
