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


CANDIDATES = 256  # best tokens top-k and top-p look at first; a trained model's nucleus is mostly smaller


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
    cut = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k < vocab or p < 1]
    if len(cut) == len(params):  # NOTE: the common batch, every row cut: no gather and scatter of the rows
        logits = _top_k_top_p(logits, top_k, top_p)
    elif cut:
        idx = torch.tensor(cut, device=dev)
        logits[idx] = _top_k_top_p(logits[idx], [top_k[i] for i in cut], [top_p[i] for i in cut])
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


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int = CANDIDATES) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, on each row's best `width` tokens (topk is 5-20x cheaper
    than sorting a 49K vocabulary on the CPU); rows whose cut lies beyond them, a wide nucleus over a
    flat distribution, go again with 16x as many, up to the whole vocabulary. NOTE: on a GPU the whole
    vocabulary at once: a sort is cheap there, and checking a row's cut would wait for the device."""
    dev, vocab = logits.device, logits.shape[1]
    width = min(vocab, max([width if dev.type == "cpu" else vocab] + [k for k in top_k if k < vocab]))
    values, order = logits.topk(width, dim=-1)  # (R, width), best first
    k, p = torch.tensor(top_k, device=dev)[:, None], torch.tensor(top_p, device=dev)[:, None]
    # top-p's probabilities are over what top-k kept: within the candidates where top-k cuts there
    in_top_k = values.masked_fill(_rank(width, dev) >= k, -float("inf"))
    norm = torch.logsumexp(in_top_k, -1, keepdim=True)
    if max(top_k) >= vocab:  # rows without top-k: over the whole row (a pass the others need not pay for)
        norm = torch.where(k < vocab, norm, torch.logsumexp(logits, -1, keepdim=True))
    kept = _cut(values, (values - norm).exp(), k, p)
    out = torch.full_like(logits, -float("inf")).scatter_(1, order, kept)
    if width == vocab:
        return out
    # complete: top-k cut within the candidates, or top-p dropped the last of them and so all after
    complete = ((k[:, 0] <= width) | torch.isneginf(kept[:, -1])).tolist()
    rest = [i for i, done in enumerate(complete) if not done]
    if rest:
        idx = torch.tensor(rest, device=dev)
        out[idx] = _top_k_top_p(logits[idx], [top_k[i] for i in rest], [top_p[i] for i in rest], width * 16)
    return out


def _cut(sorted_logits: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Best-first logits with the tokens top-k and top-p drop at −inf; probs are the tokens' probabilities
    over what top-k keeps (only those within top-k are read). Top-p keeps the smallest prefix whose mass
    reaches top_p; rank 0 always stays."""
    rank = _rank(sorted_logits.shape[1], sorted_logits.device)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    drop = (rank >= top_k) | ((mass_before >= top_p) & (rank > 0))
    return sorted_logits.masked_fill(drop, -float("inf"))


def _rank(width: int, device) -> torch.Tensor:
    return torch.arange(width, device=device)[None, :]
