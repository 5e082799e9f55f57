"""`distill`: a student trained from a teacher that shares its vocabulary (training/README.md).

loss = w_ce·CE + w_kl·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) [+ w_hidden·MSE(P·h_s, h_t)], with
the teacher in inference mode. The student starts from scratch at a size preset, or from a
passthrough slice of the teacher's first layers. The projection P is dropped on save.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.data import default_corpus, pack, read_texts
from counterpoint.training.merge import MergeConfig, run_merge
from counterpoint.training.presets import PRESETS
from counterpoint.training.pretrain import CHECKPOINT, LoopConfig, autocast, load_checkpoint, train_loop


@dataclass(frozen=True, kw_only=True)
class DistillConfig(LoopConfig):
    teacher: Path
    preset: str = "tiny"
    init_layers: int | None = None  # start from the teacher's first k layers instead of a preset
    w_ce: float = 0.5
    w_kl: float = 0.5
    temperature: float = 2.0
    w_hidden: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.init_layers is None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if min(self.w_ce, self.w_kl, self.w_hidden) < 0:
            raise ValueError("w_ce, w_kl and w_hidden must be >= 0")


class Distiller(nn.Module):
    """The trained modules together: the student and, with w_hidden, the projection."""

    def __init__(self, student, teacher_hidden: int | None):
        super().__init__()
        self.student = student
        hidden = student.config.hidden_size
        self.projection = nn.Linear(hidden, teacher_hidden, bias=False) if teacher_hidden else None


def distill_loss(cfg: DistillConfig, trained: Distiller, teacher, batch: torch.Tensor) -> torch.Tensor:
    inputs, want_hidden = batch[:, :-1], trained.projection is not None
    with autocast():
        s_out = trained.student(input_ids=inputs, use_cache=False, output_hidden_states=want_hidden)
        with torch.inference_mode():
            t_out = teacher(input_ids=inputs, use_cache=False, output_hidden_states=want_hidden)
    vocab = min(s_out.logits.shape[-1], t_out.logits.shape[-1])
    s_logits, t_logits = s_out.logits[..., :vocab].float(), t_out.logits[..., :vocab].float().clone()
    ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, vocab), inputs[:, 1:].reshape(-1))
    kl = kl_to_teacher(s_logits, t_logits, cfg.temperature) * cfg.temperature**2
    loss = cfg.w_ce * ce + cfg.w_kl * kl
    if want_hidden:
        projected = trained.projection(s_out.hidden_states[-1].float())
        loss = loss + cfg.w_hidden * F.mse_loss(projected, t_out.hidden_states[-1].float().clone())
    return loss


def kl_to_teacher(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(softmax(z_t/T) ‖ softmax(z_s/T))."""
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


@torch.no_grad()
def evaluate(student, teacher, rows: torch.Tensor, batch_size: int = 16, max_rows: int = 128) -> dict:
    student.eval()
    ce = kl = 0.0
    rows = rows[:max_rows]
    for i in range(0, len(rows), batch_size):
        inputs = rows[i : i + batch_size, :-1]
        with autocast():
            s, t = student(input_ids=inputs).logits.float(), teacher(input_ids=inputs).logits.float()
        vocab = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :vocab], t[..., :vocab]
        ce += F.cross_entropy(s[:, :-1].reshape(-1, vocab), inputs[:, 1:].reshape(-1)).item() * len(inputs)
        kl += kl_to_teacher(s, t).item() * len(inputs)
    student.train()
    return {"ce": ce / len(rows), "kl": kl / len(rows)}


def distill(cfg: DistillConfig, show_progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32).eval().requires_grad_(False)
    files = list(cfg.files) or default_corpus()
    train_rows, val_rows = pack(read_texts(files, cfg.max_corpus_bytes), tokenizer, cfg.seq_len, cfg.val_fraction,
                                cfg.seed)
    trained = Distiller(_student(cfg, teacher, out), teacher.config.hidden_size if cfg.w_hidden else None)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state = {"step": 0, "history": [], "val": []}
    if cfg.resume and (out / CHECKPOINT).is_file():
        state = load_checkpoint(out, trained, optimizer)
    before = state.get("before") or evaluate(trained.student, teacher, val_rows)
    state["before"] = before
    train_loop(cfg, trained, optimizer, train_rows, state, out, lambda b: distill_loss(cfg, trained, teacher, b),
               lambda: evaluate(trained.student, teacher, val_rows)["kl"], show_progress, name="distill")
    after = evaluate(trained.student, teacher, val_rows)
    metrics = {"val_kl_before": before["kl"], "val_kl": after["kl"], "val_ce": after["ce"],
               "val_perplexity": math.exp(after["ce"]), "steps": state["step"],
               "num_parameters": sum(p.numel() for p in trained.student.parameters())}
    _save(cfg, trained.student, tokenizer, out, files, metrics)
    return metrics


def _student(cfg: DistillConfig, teacher, out: Path):
    if cfg.init_layers is None:
        config = LlamaConfig(vocab_size=teacher.config.vocab_size, max_position_embeddings=max(2048, cfg.seq_len),
                             bos_token_id=teacher.config.bos_token_id, eos_token_id=teacher.config.eos_token_id,
                             pad_token_id=teacher.config.pad_token_id, tie_word_embeddings=True, **PRESETS[cfg.preset])
        return LlamaForCausalLM(config)
    init = out / "init"
    if not (init / "config.json").is_file():
        run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": str(cfg.teacher), "layer_range": [0, cfg.init_layers]}]}]}), init, False)
    return AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)


def _save(cfg: DistillConfig, student, tokenizer, out: Path, files: list[Path], metrics: dict) -> None:
    student.config.dtype = "float32"
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=student.config.bos_token_id, eos_token_id=student.config.eos_token_id,
                     pad_token_id=student.config.pad_token_id).save_pretrained(out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "files", "seed")}
    write_provenance(out, "distill", [Path(cfg.teacher)] + files[:50], seed=cfg.seed, metrics=metrics,
                     num_files=len(files), **settings)
