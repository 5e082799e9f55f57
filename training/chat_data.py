"""Chat fine-tuning data: a JSONL of `{"messages": [...]}` conversations rendered with the model's
chat template, with the loss on the assistant turns only (every other token's label is -100)."""

import json
import random
from pathlib import Path

import torch

IGNORE = -100


def assistant_labels(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant turns' tokens
    (what the template adds for each assistant message after the generation prompt)."""
    ids, labels = [], []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full_ids = tokenizer.encode(full, add_special_tokens=False)
        labels += [IGNORE] * (len(prompt_ids) - len(ids)) + full_ids[len(prompt_ids):]
        ids = full_ids
    if not ids:
        raise ValueError("a conversation has no assistant message to learn from")
    return ids, labels


def chat_rows(path: Path, tokenizer, seq_len: int, val_fraction: float, seed: int):
    """(train, validation) tensors of shape (N, 3, seq_len): ids, labels, attention mask; each
    conversation cut to seq_len tokens and padded."""
    conversations = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"{path}:{number}: each line must be an object with a messages list")
            conversations.append(record["messages"])
    random.Random(seed).shuffle(conversations)
    num_val = max(1, int(len(conversations) * val_fraction))
    if len(conversations) <= num_val:
        raise ValueError(f"{path}: {len(conversations)} conversations leave none to train on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tuple(torch.stack([_row(c, tokenizer, seq_len, pad) for c in part])
                 for part in (conversations[num_val:], conversations[:num_val]))


def _row(messages: list[dict], tokenizer, seq_len: int, pad: int) -> torch.Tensor:
    ids, labels = assistant_labels(messages, tokenizer)
    ids, labels = ids[:seq_len], labels[:seq_len]
    fill = seq_len - len(ids)
    return torch.tensor([ids + [pad] * fill, labels + [IGNORE] * fill, [1] * len(ids) + [0] * fill])
