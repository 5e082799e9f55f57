"""Writing Hugging Face-format directories: safetensors (sharded above a limit), config,
generation config, tokenizer, and the `counterpoint.json` provenance record."""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 * 2**30


def save_tensors(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """model.safetensors, or numbered shards plus model.safetensors.index.json above shard_bytes."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_provenance(out: Path, command: str, inputs: list[Path], seed: int | None = None,
                     metrics: dict | None = None, **settings) -> None:
    """counterpoint.json: what made this directory, from what (with hashes), and how it scored."""
    record = {
        "command": command,
        "argv": sys.argv,
        "inputs": {str(p): file_sha256(p) if p.is_file() else "directory" for p in inputs},
        "seed": seed,
        "settings": settings,
        "metrics": metrics or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "counterpoint.json").write_text(json.dumps(record, indent=2, default=str))
