"""Process combined logits in the one order of decoding/README.md, "Process".

Every row keeps its own parameters. Sparse, per-row edits (bias, bans, penalties) loop over the
rows that need them; the dense steps (temperature, top-k, top-p, min-p) run on the whole batch
as tensors.
"""

from dataclasses import dataclass

import torch

from counterpoint.decoding.params import SamplingParams


@dataclass(slots=True)
class Row:
    """What processing needs to know about one hypothesis row."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    eos_ids: tuple[int, ...]  # banned until min_tokens is reached
    context_weight: float | None = None  # set by combining (ACD, AdaCAD) when decoding info is asked for
    grammar: object = None  # the hypothesis's xgrammar matcher, for structured outputs


def process(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """(R, V) combined logits -> (R, V) float32 log q, the distribution that is decoded."""
    logits = logits.float().clone()
    constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
    before_bans = logits[constrained].clone() if constrained else None
    for i, row in enumerate(rows):
        _bias_and_bans(logits[i], row)
    if constrained:
        _grammar_mask(logits, before_bans, constrained, [rows[i] for i in constrained])
    for i, row in enumerate(rows):
        _penalties(logits[i], row)
    # NOTE: an extreme repetition_penalty can overflow a logit to inf, and inf − inf is NaN later;
    # bans stay −inf.
    logits.clamp_(max=torch.finfo(torch.float32).max)
    sampling = [i for i, row in enumerate(rows) if not row.params.is_greedy and not row.params.use_beam_search]
    if sampling:
        idx = torch.tensor(sampling, device=logits.device)
        logits[idx] = warp(logits[idx], [rows[i].params for i in sampling])
    return torch.log_softmax(logits, dim=-1)


def _bias_and_bans(z: torch.Tensor, row: Row) -> None:
    p = row.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=z.device)
        z.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=z.device))
    if len(row.output_ids) < p.min_tokens:
        z[list(row.eos_ids) + list(p.stop_token_ids or [])] = -float("inf")


def _grammar_mask(logits: torch.Tensor, before_bans: torch.Tensor, idx: list[int], rows: list[Row]) -> None:
    """Tokens the grammar forbids become −inf. If bans (min_tokens' EOS ban, say) leave nothing
    the grammar allows, the grammar wins: the row is its logits before bias and bans, masked."""
    from counterpoint.decoding.grammar import allowed_tokens

    allowed = allowed_tokens([r.grammar for r in rows], [r.eos_ids for r in rows], logits.shape[1], logits.device)
    masked = logits[idx].masked_fill(~allowed, -float("inf"))
    empty = torch.isneginf(masked).all(dim=-1)
    if bool(empty.any()):
        masked[empty] = before_bans[empty].masked_fill(~allowed[empty], -float("inf"))
    logits[idx] = masked


def _penalties(z: torch.Tensor, row: Row) -> None:
    p = row.params
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long, device=z.device)
        picked = z[seen]
        z[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        out = torch.tensor(row.output_ids, dtype=torch.long, device=z.device)
        counts = torch.bincount(out, minlength=z.shape[0]).to(z.dtype)[: z.shape[0]]
        z -= counts * p.frequency_penalty + (counts > 0).to(z.dtype) * p.presence_penalty


def warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Steps 5-8 for sampling rows: temperature, top-k, top-p, min-p (filtered tokens -> -inf)."""
    dev = logits.device
    temperature = safe_divisor(torch.tensor([p.temperature for p in params], device=dev)[:, None])
    # NOTE: shifted by the row max first (softmax cannot tell): a tiny temperature then sends the
    # other tokens to −inf instead of overflowing every logit to inf, whose softmax is NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]  # NOTE: any int fits the tensor
    top_p = [p.top_p for p in params]
    if min(top_k) < logits.shape[1] or min(top_p) < 1:
        logits = _top_k_top_p(logits, torch.tensor(top_k, device=dev), torch.tensor(top_p, device=dev))
    if any(p.min_p > 0 for p in params):  # NOTE: decided on the host: no device sync
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        probs = torch.softmax(logits, dim=-1)
        cutoff = min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < cutoff, -float("inf"))
    return logits


def safe_divisor(values: torch.Tensor) -> torch.Tensor:
    """Float32 divisors kept within its normal range: a temperature of 1e-320 would round to 0
    (0/0 is NaN) and one of 1e308 to inf (−inf/inf is NaN); clamped, they give the limits."""
    info = torch.finfo(torch.float32)
    return values.float().clamp(min=info.tiny, max=info.max)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], -float("inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    # Keep the smallest prefix whose mass reaches top_p; rank 0 always stays.
    drop = (mass_before >= top_p[:, None]) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)
