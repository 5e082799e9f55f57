"""Text corpora for training: the default corpus (the standard library's .py files), a byte-level
BPE tokenizer trained on it, and packed fixed-length sequences with a held-out split."""

import random
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|pad|>"]


def default_corpus() -> list[Path]:
    """Every .py file of this Python's standard library (every install has them)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def read_texts(files: list[Path], max_bytes: int | None = None) -> list[str]:
    texts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[0],
                                   pad_token=SPECIAL[1])


def pack(texts: list[str], tokenizer, seq_len: int, val_fraction: float,
         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents joined by EOS and cut into (N, seq_len + 1) rows; documents split train/validation."""

    def rows(part: list[str]) -> torch.Tensor:
        ids = []
        for text in part:
            ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
        usable = len(ids) // (seq_len + 1) * (seq_len + 1)
        return torch.tensor(ids[:usable]).view(-1, seq_len + 1)

    train_docs, val_docs = split_documents(texts, val_fraction, seed)
    train, val = rows(train_docs), rows(val_docs)
    if not len(train) or not len(val):
        raise ValueError(f"the corpus is too small for {seq_len}-token rows in both splits "
                         f"({len(train)} train, {len(val)} validation); give more text or a shorter seq_len")
    return train, val


def split_documents(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation): the documents shuffled by `seed`, then at least one held out."""
    docs = list(texts)
    random.Random(seed).shuffle(docs)
    num_val = max(1, int(len(docs) * val_fraction))
    return docs[num_val:], docs[:num_val]
