"""The merge registry, the YAML schema (mergekit's), and lazy tensor access to source models."""

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors import safe_open

from counterpoint.serving.models.loader import DTYPES, safetensors_files

MERGE_METHODS: dict[str, callable] = {}


def register_method(name: str):
    def wrap(fn):
        MERGE_METHODS[name] = fn
        return fn

    return wrap


@dataclass(frozen=True)
class SliceSource:
    model: Path
    layer_range: tuple[int, int]


@dataclass(frozen=True)
class ModelEntry:
    model: Path
    parameters: dict = field(default_factory=dict)  # per-model values: override the top-level ones


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    slices: list[list[SliceSource]] = field(default_factory=list)
    dtype: str = "bfloat16"
    base_model: Path | None = None
    models: list[ModelEntry] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    tokenizer_source: str | None = None  # "base", or a model path; default: the base model, else the first
    out_dtype: str | None = None  # default: dtype
    seed: int = 0  # DARE's random masks

    @property
    def output_dtype(self) -> str:
        return self.out_dtype or self.dtype

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "MergeConfig":
        method = data.get("merge_method")
        if method not in MERGE_METHODS:
            raise ValueError(f"merge_method must be one of {', '.join(sorted(MERGE_METHODS))}; got {method!r}")
        slices = [[_source(s) for s in entry.get("sources", [])] for entry in data.get("slices", [])]
        dtype = data.get("dtype", "bfloat16")
        for key in ("dtype", "out_dtype"):
            if key in data and data[key] not in DTYPES:
                raise ValueError(f"{key} must be one of {', '.join(DTYPES)}; got {data[key]!r}")
        base = data.get("base_model")
        models = [_model_entry(m) for m in data.get("models", [])]
        return cls(method, slices, dtype, Path(base) if base else None, models, dict(data.get("parameters") or {}),
                   data.get("tokenizer_source"), data.get("out_dtype"), int(data.get("seed", 0)))


def _model_entry(entry) -> ModelEntry:
    if isinstance(entry, str):
        return ModelEntry(Path(entry))
    if not isinstance(entry, dict) or "model" not in entry:
        raise ValueError(f"each entry of models needs a model; got {entry!r}")
    return ModelEntry(Path(entry["model"]), dict(entry.get("parameters") or {}))


def _source(entry: dict) -> SliceSource:
    if "model" not in entry or "layer_range" not in entry:
        raise ValueError(f"each slice source needs model and layer_range; got {entry!r}")
    start, end = entry["layer_range"]
    if not 0 <= start < end:
        raise ValueError(f"layer_range must be [start, end) with 0 <= start < end; got {entry['layer_range']!r}")
    return SliceSource(Path(entry["model"]), (int(start), int(end)))


class LazyModel:
    """Tensors of one HF directory, read one at a time on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.where = {}
        for file in safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                self.where.update({name: file for name in f.keys()})

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str):
        with safe_open(self.where[name], framework="pt") as f:
            return f.get_tensor(name)


def run_merge(config: MergeConfig, out: str | Path, show_progress: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return MERGE_METHODS[config.merge_method](config, out, show_progress)
