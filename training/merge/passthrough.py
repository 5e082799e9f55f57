"""Passthrough: stack layer slices of source models (frankenmerges, depth up-scaling, early-exit
amateurs). Non-layer tensors (embeddings, final norm, lm_head) come from the first source."""

import re
from pathlib import Path

from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from counterpoint.serving.models.loader import DTYPES
from counterpoint.training.checkpoint import save_tensors, write_provenance
from counterpoint.training.merge.base import LazyModel, MergeConfig, register_method

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@register_method("passthrough")
def passthrough(config: MergeConfig, out: Path, show_progress: bool) -> Path:
    sources = [s for entry in config.slices for s in entry]
    if not sources or any(len(entry) != 1 for entry in config.slices):
        raise ValueError("passthrough needs slices with exactly one source each")
    models = {s.model: LazyModel(s.model) for s in sources}
    first = models[sources[0].model]
    layer_map = [(s.model, i) for s in sources for i in range(*s.layer_range)]  # output layer -> source layer
    _check_ranges(sources)
    dtype = DTYPES[config.dtype]
    tensors = {name: first.get(name).to(dtype) for name in first.names() if not LAYER.match(name)}
    for out_layer, (model, src_layer) in enumerate(tqdm(layer_map, desc="passthrough", disable=not show_progress)):
        for name in models[model].names():
            match = LAYER.match(name)
            if match and int(match.group(1)) == src_layer:
                tensors[f"model.layers.{out_layer}.{match.group(2)}"] = models[model].get(name).to(dtype)
    save_tensors(tensors, out)
    _write_metadata(sources[0].model, out, len(layer_map), config.dtype)
    write_provenance(out, "merge", sorted(models), method="passthrough", dtype=config.dtype,
                     layers=[f"{m}:{i}" for m, i in layer_map])
    return out


def _check_ranges(sources) -> None:
    for s in sources:
        num_layers = AutoConfig.from_pretrained(s.model).num_hidden_layers
        if s.layer_range[1] > num_layers:
            raise ValueError(f"layer_range {list(s.layer_range)} exceeds the {num_layers} layers of {s.model}")


def _write_metadata(source: Path, out: Path, num_layers: int, dtype: str) -> None:
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = num_layers
    config.dtype = dtype
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1] * num_layers
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(out)
