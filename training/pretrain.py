"""`pretrain`: a byte-level BPE tokenizer and a Llama-architecture model trained from text files.

Packed sequences, AdamW (β = 0.9, 0.95), linear warm-up then cosine decay, bf16 autocast where the
CPU or GPU supports it, a held-out validation split, resumable checkpoints.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.data import default_corpus, pack, read_texts, train_tokenizer
from counterpoint.training.presets import PRESETS

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """What every training command shares: data, optimisation schedule, checkpoints."""

    out: Path
    files: list[Path] = field(default_factory=list)  # empty: the standard library's .py files
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    val_fraction: float = 0.05
    eval_every: int = 100
    save_every: int = 100
    max_corpus_bytes: int | None = 4_000_000
    seed: int = 0
    resume: bool = False
    stop_at: int | None = None  # end this run early (the schedule still spans `steps`)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(LoopConfig):
    preset: str = "tiny"
    vocab_size: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1; got {self.vocab_size}")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(cfg: PretrainConfig, show_progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list(cfg.files) or default_corpus()
    texts = read_texts(files, cfg.max_corpus_bytes)
    tokenizer = _tokenizer(cfg, out, texts)
    train_rows, val_rows = pack(texts, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    model = LlamaForCausalLM(_model_config(cfg, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state = {"step": 0, "history": [], "val": []}
    if cfg.resume and (out / CHECKPOINT).is_file():
        state = load_checkpoint(out, model, optimizer)
    initial_val = state["val"][0][1] if state["val"] else evaluate(model, val_rows)
    if not state["val"]:
        state["val"].append((0, initial_val))
    loss_fn = lambda batch: lm_loss(model, batch)  # noqa: E731
    eval_fn = lambda: evaluate(model, val_rows)  # noqa: E731
    train_loop(cfg, model, optimizer, train_rows, state, out, loss_fn, eval_fn, show_progress)
    final_val = evaluate(model, val_rows)
    metrics = {"initial_val_loss": initial_val, "val_loss": final_val, "val_perplexity": math.exp(final_val),
               "steps": state["step"], "train_tokens": state["step"] * cfg.batch_size * cfg.seq_len,
               "num_train_rows": len(train_rows), "num_val_rows": len(val_rows)}
    _save(cfg, model, tokenizer, out, files, metrics)
    return metrics


def _tokenizer(cfg: PretrainConfig, out: Path, texts: list[str]):
    if cfg.resume and (out / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save_pretrained(out)
    return tokenizer


def _model_config(cfg: PretrainConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(2048, cfg.seq_len),
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **PRESETS[cfg.preset])


def autocast(device_type: str = "cpu"):
    # bf16 matmuls where the hardware has them; float32 otherwise. NOTE: on a CPU without AVX-512
    # bf16 or AMX, bf16 is emulated and a training step runs about 5x slower than in float32.
    if device_type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=supported)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    with autocast():
        return model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False).loss


def train_loop(cfg, model, optimizer, train_rows, state, out, loss_fn, eval_fn, show_progress, name="pretrain"):
    """Steps from state["step"] to cfg.steps (or cfg.stop_at); `model` is every trained module."""
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    bar = tqdm(total=last, initial=state["step"], desc=name, disable=not show_progress)
    model.train()
    while state["step"] < last:
        step = state["step"]
        started = time.perf_counter()
        batch = train_rows[torch.randint(len(train_rows), (cfg.batch_size,),
                                         generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["step"] = step + 1
        state["history"].append(loss.item())
        tok_s = batch[:, :-1].numel() / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
        if state["step"] % cfg.eval_every == 0:
            state["val"].append((state["step"], eval_fn()))
            bar.write(f"step {state['step']}: val loss {state['val'][-1][1]:.3f}")
        if state["step"] % cfg.save_every == 0 or state["step"] == last:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}, out / CHECKPOINT)
    bar.close()


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch_size: int = 16, max_rows: int = 256) -> float:
    """Mean next-token loss over (up to max_rows of) the held-out rows."""
    model.eval()
    rows = rows[:max_rows]
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        with autocast():
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), use_cache=False).loss
        total += loss.item() * len(batch)
        count += len(batch)
    model.train()
    return total / count


def load_checkpoint(out: Path, model, optimizer) -> dict:
    saved = torch.load(out / CHECKPOINT, weights_only=False)
    model.load_state_dict(saved.pop("model"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    return saved


def _save(cfg: PretrainConfig, model, tokenizer, out: Path, files: list[Path], metrics: dict) -> None:
    model.config.dtype = "float32"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "files", "seed")}
    write_provenance(out, "pretrain", files[:50], seed=cfg.seed, metrics=metrics, num_files=len(files), **settings)
