"""`perplexity`: held-out perplexity of one or more models on the same text (by default the
standard library's .py files, which every Python install has)."""

import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from counterpoint.training.data import default_corpus, pack, read_texts, split_documents
from counterpoint.training.pretrain import autocast

VAL_FRACTION = 0.2
MAX_CORPUS_BYTES = 2_000_000


@torch.no_grad()
def perplexity(model_dir: Path, rows_of_text: list[str], seq_len: int, max_rows: int, seed: int) -> float:
    """exp(mean next-token loss) over the validation split of `rows_of_text` for this model's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, rows = pack(rows_of_text, tokenizer, seq_len, VAL_FRACTION, seed)
    rows = rows[:max_rows]
    total = 0.0
    for i in tqdm(range(0, len(rows), 8), desc=model_dir.name, leave=False):
        batch = rows[i : i + 8, :-1]
        with autocast():
            total += model(input_ids=batch, labels=batch.clone()).loss.item() * len(batch)
    return math.exp(total / len(rows))


def compare(models: list[Path], files: list[Path], seq_len: int = 256, max_rows: int = 64,
            max_corpus_bytes: int = MAX_CORPUS_BYTES, seed: int = 0) -> dict[str, float]:
    texts = read_texts(files or default_corpus(), max_corpus_bytes)
    return {str(m): perplexity(Path(m), texts, seq_len, max_rows, seed) for m in models}


def unscored_documents() -> list[str]:
    """The documents of the default text that `compare` does not score by default: training on
    them keeps its perplexities held out."""
    return split_documents(read_texts(default_corpus(), MAX_CORPUS_BYTES), VAL_FRACTION, 0)[0]
