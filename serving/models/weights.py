"""Hugging Face tensor names onto the model's packed parameters (q/k/v -> qkv_proj, gate/up ->
gate_up_proj), with a check that every parameter was set."""

import torch
from torch import nn

from counterpoint.serving.models.shape import LlamaShape

# HF tensor name fragment -> (our packed parameter fragment, index of the shard in the pack)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def load_weights(model: nn.Module, named_tensors) -> None:
    """Copy HF-named tensors into `model`; raises if any parameter was left unset."""
    shape: LlamaShape = model.shape
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in named_tensors:
        name = name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and shape.tie_word_embeddings):
            continue
        target, shard = locate(name)
        if target not in params:
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
        _copy_shard(shape, params[target], tensor, target, shard)
        loaded.add(target if shard is None else f"{target}#{shard}")
    _check_complete(shape, params, loaded)


def locate(name: str) -> tuple[str, int | None]:
    """An HF name (without `model.`) -> our parameter or module name, and its shard in a pack."""
    for fragment, (packed, shard) in PACKED.items():
        if f".{fragment}." in name:
            return name.replace(fragment, packed), shard
    return name, None


def _copy_shard(shape: LlamaShape, param: nn.Parameter, tensor: torch.Tensor, target: str,
                shard: int | None) -> None:
    if shard is None:
        if param.shape != tensor.shape:
            raise ValueError(f"{target}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        param.data.copy_(tensor)
        return
    sizes = _shard_sizes(shape, target)
    start = sum(sizes[:shard])
    param.data[start : start + sizes[shard]].copy_(tensor)


def _shard_sizes(shape: LlamaShape, target: str) -> list[int]:
    if "qkv_proj" in target:
        return [shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim,
                shape.num_kv_heads * shape.head_dim]
    return [shape.intermediate_size, shape.intermediate_size]


def _check_complete(shape: LlamaShape, params: dict, loaded: set) -> None:
    missing = []
    for name in params:
        shards = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 0
        if shards:
            missing += [f"{name}#{i}" for i in range(shards) if f"{name}#{i}" not in loaded]
        elif name not in loaded and not (name == "lm_head.weight" and shape.tie_word_embeddings):
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}")
