"""`train world`: the synthetic world's training text and questions, a small model pretrained on the
text, and a greedy exact-match check of what it learned (training/README.md)."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.pretrain import PretrainConfig, pretrain
from counterpoint.training.world import eval_questions, make_world, prompt, training_examples

NUM_SHARDS = 20  # pretrain holds out whole files: one of the twenty is the validation text


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    out: Path
    seed: int = 0
    num_known: int = 25
    num_held_out: int = 25
    num_reading: int = 8000
    repeats: int = 80
    passage_every: int = 5
    steps: int = 1500
    preset: str = "world"
    vocab_size: int = 768
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50

    def __post_init__(self):
        for name in ("num_known", "num_held_out"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (a conflicting value comes from another country); "
                                 f"got {getattr(self, name)}")
        if self.num_reading < 0 or min(self.repeats, self.passage_every) < 1:
            raise ValueError("num_reading must be >= 0, repeats and passage_every >= 1; got "
                             f"{self.num_reading}, {self.repeats}, {self.passage_every}")


def train_world(cfg: WorldConfig, show_progress: bool = True) -> dict:
    """Writes OUT/world-train/, OUT/world.jsonl and the model in OUT; returns its metrics."""
    started = time.perf_counter()
    out = Path(cfg.out)
    world = make_world(cfg.seed, cfg.num_known, cfg.num_held_out, cfg.num_reading)
    examples = training_examples(world, cfg.seed, cfg.repeats, cfg.passage_every)
    shards = write_training_text(examples, out / "world-train")
    questions = eval_questions(world, cfg.seed)
    (out / "world.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    metrics = pretrain(PretrainConfig(out=out, files=shards, preset=cfg.preset, vocab_size=cfg.vocab_size,
                                      seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                                      warmup=cfg.warmup, eval_every=cfg.steps, save_every=cfg.steps,
                                      max_corpus_bytes=None, seed=cfg.seed), show_progress)
    metrics |= check(out, questions)
    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "seed")}
    write_provenance(out, "train world", shards, seed=cfg.seed, metrics=metrics, **settings)
    return metrics


def write_training_text(examples: list[str], folder: Path) -> list[Path]:
    """The examples, blank-line separated, dealt round-robin into NUM_SHARDS files."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / f"part-{i:02d}.txt" for i in range(NUM_SHARDS)]
    for i, shard in enumerate(shards):
        shard.write_text("\n".join(examples[i::NUM_SHARDS]))
    return shards


def check(model_dir: Path, questions: list[dict]) -> dict:
    """Greedy exact match on known facts without a passage and on held-out ones without and with
    the gold passage."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    known = [q for q in questions if q["known"]]
    held_out = [q for q in questions if not q["known"]]
    return {"em_known_no_passage": exact_match(model, tokenizer, known, None),
            "em_held_out_no_passage": exact_match(model, tokenizer, held_out, None),
            "em_held_out_gold": exact_match(model, tokenizer, held_out, "gold")}


@torch.no_grad()
def exact_match(model, tokenizer, questions: list[dict], passage: str | None, batch_size: int = 50) -> float:
    """Fraction whose greedy completion, up to its first newline and stripped, is the answer
    (case-insensitively); `passage` names the passage field put before the question, or None."""
    hits = 0
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        prompts = [prompt(q["question"], q[passage] if passage else None) for q in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.split("\n")[0].strip().lower() == q["answers"][0].lower() for t, q in zip(texts, batch))
    return hits / len(questions)


def summary(metrics: dict) -> str:
    return (f"greedy exact match: known facts without a passage {metrics['em_known_no_passage']:.0%}; held-out "
            f"facts without a passage {metrics['em_held_out_no_passage']:.0%}, with the gold passage "
            f"{metrics['em_held_out_gold']:.0%} ({metrics['wall_s']:.0f} s in all)")
