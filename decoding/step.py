"""One decoding step for a batch of requests: combine, process, select (DESIGN.md)."""

from dataclasses import dataclass

import torch

from counterpoint.decoding.params import SamplingParams
from counterpoint.decoding.processing import Row, process
from counterpoint.decoding.selection import TokenChoice, describe, sample_rows


@dataclass(slots=True)
class DecodeGroup:
    """One request's share of the step: a row per live hypothesis, in hypothesis order."""

    params: SamplingParams
    rows: list[Row]
    fanout: int  # children per hypothesis: n on the first step of parallel sampling, else 1
    generator: torch.Generator | None


def step(logits: torch.Tensor, groups: list[DecodeGroup]) -> list[list[TokenChoice]]:
    """(R, V) main-stream logits, R = total rows of all groups -> each group's token choices."""
    row_idx, parents, rows, generators, offset = [], [], [], [], 0
    for group in groups:
        for h, row in enumerate(group.rows):
            row_idx += [offset + h] * group.fanout
            parents += [h] * group.fanout
            rows += [row] * group.fanout
            generators += [group.generator] * group.fanout
        offset += len(group.rows)
    if len(row_idx) != logits.shape[0]:
        logits = logits[torch.tensor(row_idx, device=logits.device)]  # (R', V) one row per child
    choices = _select(logits, rows, generators)
    for choice, parent in zip(choices, parents):
        choice.parent = parent
    return _split(choices, groups)


def _needs_processing(rows: list[Row]) -> bool:
    return any(
        not r.params.is_greedy or r.params.has_penalties or r.params.logit_bias or r.params.min_tokens
        or r.params.logprobs is not None or r.params.return_decoding_info or r.params.best_of
        for r in rows
    )


def _select(logits: torch.Tensor, rows: list[Row], generators: list) -> list[TokenChoice]:
    if not _needs_processing(rows):
        # NOTE: the all-greedy fast path: argmax of the raw logits is argmax of log q.
        return [TokenChoice(-1, t, None, None, []) for t in logits.argmax(dim=-1).tolist()]
    logq = process(logits, rows)
    is_greedy = [r.params.is_greedy for r in rows]
    tokens = sample_rows(logq.exp(), is_greedy, generators)
    info = describe(logq, tokens, [r.params.logprobs or 0 for r in rows])
    raw = _raw_logprobs(logits, tokens, rows)
    return [
        TokenChoice(-1, t, lp, rank, top, raw[i])
        for i, (t, (lp, rank, top)) in enumerate(zip(tokens.tolist(), info))
    ]


def _raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Row]) -> list[float | None]:
    if not any(r.params.return_decoding_info for r in rows):
        return [None] * len(rows)
    raw = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1).tolist()
    return [v if r.params.return_decoding_info else None for v, r in zip(raw, rows)]


def _split(choices: list[TokenChoice], groups: list[DecodeGroup]) -> list[list[TokenChoice]]:
    out, start = [], 0
    for group in groups:
        end = start + len(group.rows) * group.fanout
        out.append(choices[start:end])
        start = end
    return out
