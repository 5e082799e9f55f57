"""A repetition anti-expert: the expert with its last layers fine-tuned to repeat itself more.

Contrastive decoding scores log p_E − β·log p_A, so it rewards what the expert predicts more
strongly than the amateur. Weak amateurs of a small expert (its early exits, a distilled student)
predict the expert's copying less well than the expert does: on the bundled 135M expert's greedy
loops they give the repeated tokens e^-4 to e^-11 of the expert's probability, so CD rewards the
loops instead of removing them. This amateur is an anti-expert in the sense of DExperts (Liu et
al. 2021): trained on the behaviour to avoid. Its loss is cross-entropy on the repeated n-gram
spans of the expert's own greedy replies, so it predicts a loop more confidently than the expert.
Only the last layers train, so elsewhere the two stay close and CD mostly keeps the expert's
choice (log p_E − β·log p_E has the expert's argmax for β < 1); an optional KL(expert ‖ model)
on the other tokens (`w_kl`) holds them closer still. The output is a plain Llama directory in
the expert's dtype.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from counterpoint.training.checkpoint import write_provenance
from counterpoint.training.distill import kl_to_teacher
from counterpoint.training.pretrain import CHECKPOINT, LoopConfig, train_loop
from counterpoint.training.replies import Reply

IGNORE = -100  # cross_entropy's ignore_index: targets of tokens that only the KL term sees
PAD = -1  # past a reply's end; fed to the model as token 0
UNUSED_SETTINGS = ("out", "seed", "files", "max_corpus_bytes", "weight_decay", "resume", "val_fraction")


@dataclass(frozen=True, kw_only=True)
class AntiExpertConfig(LoopConfig):
    expert: Path
    trained_layers: int = 6  # the last layers, where the expert's copying happens
    ngram: int = 4
    w_kl: float = 0.0  # 1.0 kept the expert's other tokens closer but removed fewer loops (README)
    val_replies: int = 4  # held out of training for the provenance metrics

    def __post_init__(self):
        super().__post_init__()
        if min(self.trained_layers, self.ngram, self.val_replies) < 1 or self.w_kl < 0:
            raise ValueError("trained_layers, ngram and val_replies must be >= 1 and w_kl >= 0")


def repeated_spans(tokens: list[int], n: int) -> list[bool]:
    """True on every token of each n-gram that already occurred earlier in `tokens`."""
    marked, seen = [False] * len(tokens), set()
    for end in range(n, len(tokens) + 1):
        gram = tuple(tokens[end - n : end])
        if gram in seen:
            marked[end - n : end] = [True] * n
        seen.add(gram)
    return marked


def training_rows(replies: list[Reply], n: int) -> torch.Tensor:
    """(replies, 2, length): each reply's prompt and reply tokens, right-padded with PAD, over the
    targets of its next-token loss: the token inside a repeated span of the reply, IGNORE elsewhere."""
    length = max(len(r.prompt_ids) + len(r.reply_ids) for r in replies)
    rows = torch.full((len(replies), 2, length), IGNORE)
    rows[:, 0] = PAD
    for i, r in enumerate(replies):
        tokens = r.prompt_ids + r.reply_ids
        rows[i, 0, : len(tokens)] = torch.tensor(tokens)
        spans = torch.tensor([False] * len(r.prompt_ids) + repeated_spans(r.reply_ids, n))
        rows[i, 1, : len(tokens)] = torch.where(spans, torch.tensor(tokens), IGNORE)
    return rows


def loss_terms(model, expert, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the repeated spans and KL(expert ‖ model) on the other real tokens (0
    without an expert)."""
    inputs, targets = rows[:, 0, :-1].clamp(min=0), rows[:, 1, 1:]
    # NOTE: right padding needs no attention mask: a causal model's real tokens never see it.
    logits = model(input_ids=inputs, use_cache=False).logits.float()
    spans = targets != IGNORE
    ce = F.cross_entropy(logits[spans], targets[spans]) if spans.any() else logits.sum() * 0
    if expert is None:
        return ce, torch.zeros(())
    with torch.no_grad():
        reference = expert(input_ids=inputs, use_cache=False).logits.float()
    others = ~spans & (rows[:, 0, 1:] != PAD)
    return ce, kl_to_teacher(logits[others], reference[others])


def fit_anti_expert(cfg: AntiExpertConfig, replies: list[Reply], show_progress: bool = True) -> dict:
    """Write the anti-expert to cfg.out; returns metrics on the held-out replies."""
    torch.manual_seed(cfg.seed)
    expert = AutoModelForCausalLM.from_pretrained(cfg.expert, dtype=torch.float32).eval().requires_grad_(False)
    model = AutoModelForCausalLM.from_pretrained(cfg.expert, dtype=torch.float32).requires_grad_(False)
    layers = model.model.layers
    if cfg.trained_layers > len(layers):
        raise ValueError(f"trained_layers must be <= the expert's {len(layers)} layers; got {cfg.trained_layers}")
    trained = torch.nn.ModuleList(layers[len(layers) - cfg.trained_layers :]).requires_grad_(True)
    looping = [r for r in replies if any(repeated_spans(r.reply_ids, cfg.ngram))]
    if len(looping) <= cfg.val_replies:
        raise ValueError(f"only {len(looping)} replies repeat an {cfg.ngram}-gram; need more than "
                         f"val_replies={cfg.val_replies}: ask for longer replies")
    val = training_rows(looping[: cfg.val_replies], cfg.ngram)
    train = training_rows(looping[cfg.val_replies :], cfg.ngram)
    before = held_out_metrics(expert, None, val)

    def loss(rows: torch.Tensor) -> torch.Tensor:
        ce, kl = loss_terms(model, expert if cfg.w_kl else None, rows)
        return ce + cfg.w_kl * kl

    @torch.no_grad()
    def validate() -> float:
        return loss(val).item()

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = {"step": 0, "history": [], "val": []}
    train_loop(cfg, trained, optimizer, train, state, out, loss, validate, show_progress, name="anti-expert")
    (out / CHECKPOINT).unlink()
    metrics = {"val_span_logprob_expert": before["span_logprob"], **held_out_metrics(model, expert, val),
               "num_replies": len(looping), "repeated_tokens": int((train[:, 1] != IGNORE).sum())}
    _save(cfg, model, out, metrics)
    return metrics


@torch.no_grad()
def held_out_metrics(model, expert, rows: torch.Tensor) -> dict:
    """The mean log-probability of the repeated spans' tokens, and the KL to the expert elsewhere
    (0 without an expert)."""
    ce, kl = loss_terms(model, expert, rows)
    return {"span_logprob": -ce.item(), "kl_elsewhere": kl.item()}


def _save(cfg: AntiExpertConfig, model, out: Path, metrics: dict) -> None:
    dtype = AutoConfig.from_pretrained(cfg.expert).dtype or torch.float32
    model.to(getattr(torch, str(dtype).removeprefix("torch."))).save_pretrained(out)
    AutoTokenizer.from_pretrained(cfg.expert).save_pretrained(out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in UNUSED_SETTINGS}
    write_provenance(out, "anti-expert", [Path(cfg.expert)], seed=cfg.seed, metrics=metrics, **settings)
