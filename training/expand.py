"""`expand`: block expansion (Wu et al. 2024, "LLaMA Pro"): after every k-th decoder block, a copy
of it whose o_proj and down_proj are zero, so each new block adds nothing to the residual stream
and the expanded model computes exactly what the source did. With `train`, only the new blocks
are trained on the given text (the source blocks, embeddings and head stay frozen), which is how
LLaMA Pro adds knowledge without forgetting.
"""

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from counterpoint.training.checkpoint import save_tensors, write_provenance
from counterpoint.training.data import default_corpus, pack, read_texts
from counterpoint.training.merge.base import LazyModel
from counterpoint.training.pretrain import LoopConfig, evaluate, lm_loss, train_loop

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ZEROED = ("self_attn.o_proj.", "mlp.down_proj.")


@dataclass(frozen=True, kw_only=True)
class ExpandConfig(LoopConfig):
    model: Path
    every: int = 4
    train: bool = False
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.every < 1:
            raise ValueError(f"every must be >= 1; got {self.every}")


def layer_plan(num_layers: int, every: int) -> list[tuple[int, bool]]:
    """(source layer, is a new zeroed copy) for each output layer."""
    plan = []
    for i in range(num_layers):
        plan.append((i, False))
        if (i + 1) % every == 0:
            plan.append((i, True))
    return plan


def expand(cfg: ExpandConfig, show_progress: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    source = LazyModel(cfg.model)
    hf_config = AutoConfig.from_pretrained(cfg.model)
    plan = layer_plan(hf_config.num_hidden_layers, cfg.every)
    save_tensors(_expanded_tensors(source, plan), out)
    hf_config.num_hidden_layers = len(plan)
    if getattr(hf_config, "layer_types", None):
        hf_config.layer_types = hf_config.layer_types[:1] * len(plan)
    hf_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(cfg.model).save_pretrained(out)
    if (cfg.model / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(cfg.model).save_pretrained(out)
    new_layers = [i for i, (_, new) in enumerate(plan) if new]
    metrics = _train_new_blocks(cfg, out, new_layers, show_progress) if cfg.train else {}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "model", "files", "seed", "resume")}
    write_provenance(out, "expand", [cfg.model, *cfg.files], seed=cfg.seed, metrics=metrics,
                     new_layers=new_layers, **settings)
    return {"new_layers": new_layers, **metrics}


def _expanded_tensors(source: LazyModel, plan: list[tuple[int, bool]]) -> dict[str, torch.Tensor]:
    by_layer: dict[int, list[tuple[str, str]]] = {}
    tensors = {}
    for name in source.names():
        match = LAYER.match(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append((name, match.group(2)))
        else:
            tensors[name] = source.get(name)
    for out_layer, (src_layer, new) in enumerate(plan):
        for name, suffix in by_layer[src_layer]:
            tensor = source.get(name)
            if new and suffix.startswith(ZEROED):
                tensor = torch.zeros_like(tensor)
            tensors[f"model.layers.{out_layer}.{suffix}"] = tensor
    return tensors


def _train_new_blocks(cfg: ExpandConfig, out: Path, new_layers: list[int], show_progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    dtype = AutoConfig.from_pretrained(out).dtype
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = [p for i in new_layers for p in model.model.layers[i].parameters()]
    model.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    texts = read_texts(list(cfg.files) or default_corpus(), cfg.max_corpus_bytes)
    train_rows, val_rows = pack(texts, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state = {"step": 0, "history": [], "val": []}
    before = evaluate(model, val_rows)
    train_loop(cfg, model, optimizer, train_rows, state, out, lambda batch: lm_loss(model, batch),
               lambda: evaluate(model, val_rows), show_progress, name="expand")
    after = evaluate(model, val_rows)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32))
    model.save_pretrained(out)
    return {"val_loss_before": before, "val_loss": after, "val_perplexity": math.exp(after),
            "steps": state["step"], "trained_parameters": sum(p.numel() for p in trained)}
