"""`upscale`: depth up-scaling (Kim et al. 2024, "SOLAR 10.7B"): two copies of an n-layer model,
the first without its last m layers and the second without its first m, stacked into 2(n − m)
layers (SOLAR: n = 32, m = 8, 48 layers), then usually trained further. A passthrough merge."""

from pathlib import Path

from transformers import AutoConfig

from counterpoint.training.merge import MergeConfig, run_merge


def upscale(model: Path, out: Path, overlap: int, dtype: str = "bfloat16", show_progress: bool = True) -> Path:
    n = AutoConfig.from_pretrained(model).num_hidden_layers
    if not 0 < overlap < n:
        raise ValueError(f"overlap must be in [1, {n - 1}] for a model of {n} layers; got {overlap}")
    return run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "dtype": dtype, "slices": [
        {"sources": [{"model": str(model), "layer_range": [0, n - overlap]}]},
        {"sources": [{"model": str(model), "layer_range": [overlap, n]}]},
    ]}), out, show_progress)
