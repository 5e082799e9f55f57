"""An early-exit amateur: a teacher's first k layers with a new lm_head fitted to the teacher.

The head is W·M, the teacher's unembedding W after a hidden × hidden map M of the k-th layer's
normalised state (a tuned lens, Belrose et al. 2023, folded into lm_head; the final norm's weight
becomes 1). M starts at the least-squares fit of the teacher's final normalised state, in closed
form, then a short KL(teacher ‖ student) refinement trains it. Both read states cached from one
teacher pass over the text, which is most of the cost: `distill` runs the teacher at every step
and gets far less done in the same minutes. The output is a plain Llama directory with an untied
lm_head, in the teacher's dtype.
"""

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from counterpoint.training.checkpoint import save_tensors, write_provenance
from counterpoint.training.data import pack
from counterpoint.training.distill import kl_to_teacher
from counterpoint.training.merge import MergeConfig, run_merge
from counterpoint.training.pretrain import CHECKPOINT, LoopConfig, train_loop


# LoopConfig fields this command has no use for (its text comes as strings, Adam has no decay).
UNUSED_SETTINGS = ("out", "teacher", "seed", "files", "max_corpus_bytes", "weight_decay", "resume")


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig(LoopConfig):
    teacher: Path
    num_layers: int = 4
    ridge: float = 1e-3  # least-squares regulariser, relative to the mean feature energy
    val_rows: int = 2  # held-out rows scored for the provenance metrics

    def __post_init__(self):
        super().__post_init__()
        if self.num_layers < 1 or self.val_rows < 1 or self.ridge < 0:
            raise ValueError("num_layers and val_rows must be >= 1 and ridge >= 0")


@dataclass(frozen=True)
class ExitStates:
    """Per token: the k-th layer's state RMS-normalised without a weight, the teacher's final
    normalised state (what its lm_head reads), and the text's next token."""

    exit: torch.Tensor
    final: torch.Tensor
    next_tokens: torch.Tensor


def fit_early_exit(cfg: EarlyExitConfig, texts: list[str], show_progress: bool = True) -> dict:
    """Write the amateur to cfg.out; returns metrics on held-out rows of `texts`."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32).eval().requires_grad_(False)
    train_rows, val_rows = pack(texts, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed)
    train = exit_states(teacher, train_rows, cfg.num_layers, show_progress)
    val = exit_states(teacher, val_rows[: cfg.val_rows], cfg.num_layers, False)
    unembed = teacher.lm_head.weight
    head = nn.Linear(unembed.shape[1], unembed.shape[1], bias=False)
    head.weight.data = least_squares(train.exit, train.final, cfg.ridge)
    scores = {"slice": score(val, unembed, lambda x: x * teacher.model.norm.weight),
              "least_squares": score(val, unembed, head)}
    _refine(cfg, head, unembed, train, val, show_progress)
    scores["fitted"] = score(val, unembed, head)
    metrics = {f"val_{what}_{name}": value for name, s in scores.items() for what, value in s.items()}
    _save(cfg, (unembed @ head.weight).detach(), texts, metrics)
    return metrics


@torch.no_grad()
def exit_states(teacher, rows: torch.Tensor, num_layers: int, show_progress: bool) -> ExitStates:
    exits, finals = [], []
    for i in tqdm(range(0, len(rows), 8), desc="teacher pass", disable=not show_progress):
        out = teacher.model(input_ids=rows[i : i + 8, :-1], output_hidden_states=True)
        exits.append(rms_normalise(out.hidden_states[num_layers], teacher.config.rms_norm_eps).flatten(0, 1))
        finals.append(out.last_hidden_state.flatten(0, 1))
    return ExitStates(torch.cat(exits), torch.cat(finals), rows[:, 1:].flatten())


def rms_normalise(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """M minimising Σ‖M·x − y‖² + λ‖M‖², λ = ridge · mean ‖x‖². For any unembedding W, the same M
    fits the logits W·M·x to the teacher's W·y with every vocabulary entry weighed alike."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    regulariser = ridge * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + regulariser, x.T @ y).T.float()


@torch.no_grad()
def score(states: ExitStates, unembed: torch.Tensor, head) -> dict:
    """Mean KL to the teacher and perplexity of the text, over the states' tokens."""
    student = head(states.exit) @ unembed.T
    return {"kl": kl_to_teacher(student, states.final @ unembed.T).item(),
            "perplexity": math.exp(F.cross_entropy(student, states.next_tokens).item())}


def _refine(cfg: EarlyExitConfig, head: nn.Linear, unembed: torch.Tensor, train: ExitStates, val: ExitStates,
            show_progress: bool) -> None:
    # NOTE: train_loop samples rows of `train_rows`; here a row holds seq_len positions of the cached
    # states, so a batch is batch_size rows of tokens as in the other commands.
    positions = torch.arange(len(train.exit)).view(-1, cfg.seq_len)

    def loss(batch: torch.Tensor) -> torch.Tensor:
        picked = batch.flatten()
        with torch.no_grad():
            teacher_logits = train.final[picked] @ unembed.T
        return kl_to_teacher(head(train.exit[picked]) @ unembed.T, teacher_logits)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    state = {"step": 0, "history": [], "val": []}
    train_loop(cfg, head, optimizer, positions, state, out, loss, lambda: score(val, unembed, head)["kl"],
               show_progress, name="fit head")
    (out / CHECKPOINT).unlink()


def _save(cfg: EarlyExitConfig, lm_head: torch.Tensor, texts: list[str], metrics: dict) -> None:
    """The teacher's first layers (a passthrough slice), then the fitted lm_head and a unit norm."""
    out = Path(cfg.out)
    dtype = str(AutoConfig.from_pretrained(cfg.teacher).dtype or "float32").removeprefix("torch.")
    run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "dtype": dtype, "slices": [
        {"sources": [{"model": str(cfg.teacher), "layer_range": [0, cfg.num_layers]}]}]}), out, False)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones_like(tensors["model.norm.weight"])
    tensors["lm_head.weight"] = lm_head.to(tensors["model.norm.weight"].dtype)
    save_tensors(tensors, out)
    config = AutoConfig.from_pretrained(out)
    config.tie_word_embeddings = False
    config.save_pretrained(out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in UNUSED_SETTINGS}
    text_sha256 = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    write_provenance(out, "early-exit", [Path(cfg.teacher)], seed=cfg.seed, metrics=metrics, num_texts=len(texts),
                     text_chars=sum(map(len, texts)), text_sha256=text_sha256, **settings)
