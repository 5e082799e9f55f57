"""`lora`: LoRA adapters (Hu et al. 2022) trained with the peft library, saved in its layout
(`adapter_config.json`, `adapter_model.safetensors`), on text files or on a JSONL of chat
conversations with the loss on the assistant turns only. `merge` folds the adapters into a full
model, W + (α/r)·B·A (α/√r with rsLoRA), in OUT/merged. `full` trains every weight instead, on
the same data and steps, for comparison. Either way the intruder dimensions of the tuned weights
against the base are counted (training/intruders.py).
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.training.chat_data import chat_rows
from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.data import default_corpus, pack, read_texts
from counterpoint.training.intruders import count_intruders, intruder_dimensions
from counterpoint.training.merge.base import LazyModel
from counterpoint.training.merge.tensorwise import ShardWriter
from counterpoint.training.pretrain import LoopConfig, train_loop

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class LoraTrainConfig(LoopConfig):
    model: Path
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGETS
    chat_data: Path | None = None
    merge: bool = False
    full: bool = False  # a full fine-tune instead, for comparison
    lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"rank must be >= 1 and alpha > 0; got {self.rank}, {self.alpha}")


def train_lora(cfg: LoraTrainConfig, show_progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    train_rows, val_rows = _data(cfg, tokenizer)
    if not cfg.full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                 target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state = {"step": 0, "history": [], "val": []}
    before = _evaluate(model, val_rows)
    train_loop(cfg, model, optimizer, train_rows, state, out, lambda batch: _loss(model, batch),
               lambda: _evaluate(model, val_rows), show_progress, name="full fine-tune" if cfg.full else "lora")
    metrics = {"val_loss_before": before, "val_loss": _evaluate(model, val_rows), "steps": state["step"],
               "trained_parameters": sum(p.numel() for p in trained)}
    (out / "checkpoint.pt").unlink(missing_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg.full:
        names = [n for n in LazyModel(cfg.model).names() if any(f".{t}." in n for t in cfg.target_modules)]
        intruders = list(count_intruders(cfg.model, out, names).values())
    else:
        intruders = [intruder_dimensions(w0, w) for name, w0, w in folded(cfg.model, out) if w is not w0]
        if cfg.merge:
            fold_adapter(cfg.model, out, out / "merged")
    metrics["intruder_dimensions"] = sum(intruders)
    metrics["matrices"] = len(intruders)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "model", "files", "seed", "resume")}
    write_provenance(out, "full-finetune" if cfg.full else "lora", [cfg.model, *cfg.files], seed=cfg.seed,
                     metrics=metrics, **settings)
    return metrics


def _data(cfg: LoraTrainConfig, tokenizer):
    if cfg.chat_data:
        return chat_rows(cfg.chat_data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    texts = read_texts(list(cfg.files) or default_corpus(), cfg.max_corpus_bytes)
    return pack(texts, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)


def _loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Plain rows: next-token loss on every token; chat rows (ids, labels, mask): on the labels."""
    if batch.dim() == 3:
        ids, labels, mask = batch.unbind(1)
        return model(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False).loss
    return model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False).loss


@torch.no_grad()
def _evaluate(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    losses = [_loss(model, rows[i : i + batch_size]).item() * len(rows[i : i + batch_size])
              for i in range(0, min(len(rows), 256), batch_size)]
    model.train()
    return sum(losses) / min(len(rows), 256)


def folded(base: Path, adapter: Path):
    """(name, base weight, weight with the adapter folded in) for every tensor of the base; the
    last is the base weight itself where no adapter applies. W + s·B·A, s = α/r (α/√r with
    rsLoRA), in the base's dtype."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    lora = {name.removeprefix("base_model.model."): t
            for name, t in load_file(adapter / "adapter_model.safetensors").items()}
    source = LazyModel(base)
    for name in source.names():
        weight = source.get(name)
        a_name = name.replace(".weight", ".lora_A.weight")
        if a_name in lora:
            b = lora[name.replace(".weight", ".lora_B.weight")]
            yield name, weight, (weight.float() + scale * b.float() @ lora[a_name].float()).to(weight.dtype)
        else:
            yield name, weight, weight


def fold_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """The base model with its adapters folded in, written to `out` with the base's config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out)
    for name, _, weight in folded(base, adapter):
        writer.add(name, weight)
    writer.close()
    for item in base.iterdir():
        if item.is_file() and item.suffix in (".json", ".jinja", ".txt") and item.name not in (
                "model.safetensors.index.json", "counterpoint.json"):
            (out / item.name).write_bytes(item.read_bytes())
    return out
