"""One decoding step for a batch of requests: combine, process, select (README.md, "How a request flows")."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from counterpoint.decoding import combine
from counterpoint.decoding.beam import BeamSearch, Candidate
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
    other: torch.Tensor | None = None  # (rows, V') logits of the second stream: amateur or no_context
    beam: BeamSearch | None = None
    make_finished: Callable[[TokenChoice], object] | None = None  # beam search: payload of a finished slot
    ends_text: Callable[[int, int], bool] | None = None  # beam search: (parent, token) completes a stop string
    beam_done: bool = False  # set by the step: the beam search is over


def step(logits: torch.Tensor, groups: list[DecodeGroup]) -> list[list[TokenChoice] | Exception]:
    """(R, V) main-stream logits, R = total rows of all groups -> each group's token choices.

    For a beam-search group the choices are its running beams after the step. A group whose
    decoding raises gets the exception in its place and the others are decoded as usual: a
    batched stage that fails is re-run one group at a time to find the culprit. NOTE: only
    stateless stages are re-run (combining, and selection for plain groups); each beam search,
    which keeps state, runs once, on its own.
    """
    offsets = _offsets(groups)
    spans = [slice(start, start + len(g.rows)) for start, g in zip(offsets, groups)]
    combined = _guarded(_combine, logits, groups, offsets)
    if isinstance(combined, Exception):
        if len(groups) == 1:
            return [combined]
        return [step(logits[span], [group])[0] for span, group in zip(spans, groups)]
    results: list = [None] * len(groups)
    plain_idx = [i for i, g in enumerate(groups) if g.beam is None]
    for i, choices in zip(plain_idx, _plain_results(combined, logits, groups, plain_idx, spans)):
        results[i] = choices
    for i, group in enumerate(groups):
        if group.beam is not None:
            results[i] = _guarded(_step_beam, combined[spans[i]], logits[spans[i]], group)
    return results


def _plain_results(combined, logits, groups, plain_idx, spans) -> list:
    """Every plain group's choices in one batch; if that raises, one group at a time."""
    if not plain_idx:
        return []
    plain = [groups[i] for i in plain_idx]
    picked = (combined, logits)  # the common case, every group plain: no gather copy of the logits
    if len(plain) < len(groups):
        rows = torch.cat([torch.arange(spans[i].start, spans[i].stop) for i in plain_idx]).to(logits.device)
        picked = (combined[rows], logits[rows])
    batch = _guarded(_step_plain, *picked, plain)
    if not isinstance(batch, Exception):
        return batch
    if len(plain) == 1:
        return [batch]
    alone = [_guarded(_step_plain, combined[spans[i]], logits[spans[i]], [groups[i]]) for i in plain_idx]
    return [r if isinstance(r, Exception) else r[0] for r in alone]


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) along rows; a view, without the copy, where the parts are rows that lie one after
    another in one tensor (every row's logits come from one lm_head pass, mostly in batch order)."""
    first = parts[0]
    row = first.shape[-1]
    total = sum(p.shape[0] for p in parts)
    if first.dim() != 2 or first.stride() != (row, 1) or any(p.shape[1:] != first.shape[1:]
                                                             or p.stride() != first.stride() for p in parts):
        return torch.cat(parts)
    storage, size, pos = first.untyped_storage().data_ptr(), first.element_size(), first.data_ptr()
    for part in parts:
        if part.untyped_storage().data_ptr() != storage or part.data_ptr() != pos:
            return torch.cat(parts)
        pos += part.shape[0] * row * size
    return first.as_strided((total, row), (row, 1))


def _guarded(fn, *args):
    """fn(*args), or the exception it raised."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001  (any failure of one request's decoding; see step)
        return err


def _offsets(groups: list[DecodeGroup]) -> list[int]:
    offsets, total = [], 0
    for group in groups:
        offsets.append(total)
        total += len(group.rows)
    return offsets


def _combine(logits: torch.Tensor, groups: list[DecodeGroup], offsets: list[int]) -> torch.Tensor:
    """Rows with a second stream replaced by their combined logits: one batched call per method
    and vocabulary size. A method's context weights land on the rows that report them."""
    batches: dict[tuple[str, int], list[tuple[int, DecodeGroup]]] = {}
    for start, group in zip(offsets, groups):
        if group.other is not None:
            batches.setdefault((group.params.combine_method, group.other.shape[-1]), []).append((start, group))
    if not batches:
        return logits
    out = None
    for (method, _), members in batches.items():
        params = [g.params.combine_params for _, g in members for _ in g.rows]
        widths = [g.params.beam_width if g.beam is not None else 1 for _, g in members for _ in g.rows]
        rows = [row for _, g in members for row in g.rows]
        other = cat_rows([g.other for _, g in members])
        if len(rows) == logits.shape[0]:  # every row in this one batch, in order: no copy to write into
            result = combine.combine(method, logits, other, params, widths)
            out = result.logits
        else:
            idx = torch.cat([torch.arange(start, start + len(g.rows)) for start, g in members]).to(logits.device)
            result = combine.combine(method, logits[idx], other, params, widths)
            out = logits.to(torch.float32, copy=True) if out is None else out
            out[idx] = result.logits
        if result.weights is not None and any(r.params.return_decoding_info for r in rows):
            for row, weight in zip(rows, result.weights.tolist()):  # NOTE: one host transfer per batch
                row.context_weight = weight
    return out


def _step_plain(combined: torch.Tensor, raw: torch.Tensor, groups: list[DecodeGroup]) -> list[list[TokenChoice]]:
    row_idx, parents, rows, generators, offset = [], [], [], [], 0
    for group in groups:
        for h, row in enumerate(group.rows):
            row_idx += [offset + h] * group.fanout
            parents += [h] * group.fanout
            rows += [row] * group.fanout
            generators += [group.generator] * group.fanout
        offset += len(group.rows)
    if len(row_idx) != combined.shape[0]:
        idx = torch.tensor(row_idx, device=combined.device)  # one row per child
        combined, raw = combined[idx], raw[idx]
    choices = _select(combined, raw, rows, generators)
    for choice, parent in zip(choices, parents):
        choice.parent = parent
    return _split(choices, groups)


def _needs_processing(rows: list[Row]) -> bool:
    return any(
        not r.params.is_greedy or r.params.has_penalties or r.params.logit_bias or r.params.min_tokens
        or r.params.logprobs is not None or r.params.return_decoding_info or r.params.best_of
        or r.grammar is not None
        for r in rows
    )


def _select(combined: torch.Tensor, raw: torch.Tensor, rows: list[Row], generators: list) -> list[TokenChoice]:
    if not _needs_processing(rows):
        # NOTE: the all-greedy fast path: argmax of the combined logits is argmax of log q. max's indices
        # are argmax's (the first maximum), 2.6x faster on the CPU at 32 rows of a 49K vocabulary.
        return [TokenChoice(-1, t, None, None, []) for t in combined.max(dim=-1).indices.tolist()]
    logq = _process(combined, raw, rows)
    is_greedy = [r.params.is_greedy for r in rows]
    tokens = sample_rows(logq.exp(), is_greedy, generators)
    return _choices(logq, raw, list(range(len(rows))), tokens, rows)


def _process(combined: torch.Tensor, raw: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """log q of every row. NOTE: a combined row can leave no token allowed (a contrastive head of
    one token that min_tokens bans, say), and log_softmax of all −inf is NaN; such a row is
    decoded from its main stream alone for this step."""
    logq = process(combined, rows)
    if not any(row.params.combine_method for row in rows):
        return logq
    empty = torch.isneginf(logq).all(dim=-1) | torch.isnan(logq).any(dim=-1)
    if not bool(empty.any()):
        return logq
    idx = empty.nonzero().squeeze(1).tolist()
    logq[idx] = process(raw[idx], [rows[i] for i in idx])
    return logq


def _choices(logq, raw, row_ids: list[int], tokens: torch.Tensor, rows: list[Row]) -> list[TokenChoice]:
    """TokenChoice per (row, token), with logprob, rank, top alternatives and raw main logprob."""
    row_idx = torch.tensor(row_ids, device=logq.device)
    picked_rows = [rows[i] for i in row_ids]
    info = describe(logq[row_idx], tokens, [r.params.logprobs or 0 for r in picked_rows])
    raw_lp = [None] * len(picked_rows)
    if any(r.params.return_decoding_info for r in picked_rows):
        raw_lp = torch.log_softmax(raw[row_idx].float(), dim=-1).gather(1, tokens[:, None]).squeeze(1).tolist()
    return [TokenChoice(-1, t, lp, rank, top, raw_lp[i] if picked_rows[i].params.return_decoding_info else None,
                        picked_rows[i].context_weight)
            for i, (t, (lp, rank, top)) in enumerate(zip(tokens.tolist(), info))]


def _step_beam(combined: torch.Tensor, raw: torch.Tensor, group: DecodeGroup) -> list[TokenChoice]:
    logq = _process(combined, raw, group.rows)

    def choose(candidates: list[Candidate]) -> list[TokenChoice]:
        tokens = torch.tensor([c.token_id for c in candidates], device=logq.device)
        choices = _choices(logq, raw, [c.parent for c in candidates], tokens, group.rows)
        for choice, candidate in zip(choices, candidates):
            choice.parent = candidate.parent
        return choices

    beam_step = group.beam.step(
        logq, len(group.rows[0].output_ids),
        hits_stop=lambda parent, token: stops(group.rows[parent], token, group.beam.max_tokens)
        or (group.ends_text is not None and group.ends_text(parent, token)),
        make_finished=lambda candidate: group.make_finished(choose([candidate])[0]),
    )
    group.beam_done = beam_step.done
    return choose(beam_step.running)


def stops(row: Row, token: int, max_tokens: int) -> bool:
    """Does appending `token` end this hypothesis (beam search's stopping criteria)?"""
    p, length = row.params, len(row.output_ids) + 1
    ended = token in (p.stop_token_ids or ()) or (token in row.eos_ids and not p.ignore_eos)
    return (ended and length >= p.min_tokens) or length >= max_tokens


def _split(choices: list[TokenChoice], groups: list[DecodeGroup]) -> list[list[TokenChoice]]:
    out, start = [], 0
    for group in groups:
        end = start + len(group.rows) * group.fanout
        out.append(choices[start:end])
        start = end
    return out
