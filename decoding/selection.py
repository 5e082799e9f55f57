"""Select tokens from log q: greedy argmax or seeded sampling, one choice per row."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class TokenChoice:
    """One new token for one hypothesis. `parent` indexes the request's hypotheses before the step."""

    parent: int
    token_id: int
    logprob: float | None  # log q of the chosen token; None on the greedy fast path
    rank: int | None  # 1 = the most likely token under q
    top_logprobs: list[tuple[int, float]]  # the k best (token, log q) when logprobs=k was asked
    raw_logprob: float | None = None  # log_softmax of the main stream, for return_decoding_info
    context_weight: float | None = None  # ACD's w or AdaCAD's α at this step, for return_decoding_info


def sample_rows(probs: torch.Tensor, is_greedy: list[bool], generators: list) -> torch.Tensor:
    """(R, V) probabilities -> (R,) token ids. Rows sharing a generator are drawn in row order.

    NOTE: a seeded request owns its generator, so its draws do not depend on the rest of the batch.
    """
    tokens = probs.max(dim=-1).indices  # NOTE: argmax's first maximum, faster on the CPU
    sampled = [i for i, greedy in enumerate(is_greedy) if not greedy]
    if not sampled:
        return tokens
    u = torch.empty(len(generators), dtype=torch.float64, device=probs.device)
    for gen in {id(g): g for g in generators}.values():
        rows = [i for i in sampled if generators[i] is gen]
        if rows:
            u[rows] = torch.rand(len(rows), generator=gen, dtype=torch.float64, device=probs.device)
    idx = torch.tensor(sampled, device=probs.device)
    tokens[idx] = _inverse_cdf(probs[idx], u[idx])
    return tokens


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(R, V) probabilities and (R,) uniform draws in [0, 1) -> (R,) tokens: the first whose cumulative
    probability passes u of the row's total. NOTE: one draw a row, where torch.multinomial draws an
    exponential for every token (about 1 ms a row of 49K on the CPU)."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    # NOTE: kept below the total, which u·total can round up to: the first sum past the target then
    # grew there, so its token has probability > 0 (the tokens after the last possible one never do)
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    if bool((tokens >= probs.shape[1]).any()):  # NOTE: the tokens go to the host next anyway
        raise ValueError("a row to sample from has no positive, finite probabilities")
    return tokens


def describe(logq: torch.Tensor, tokens: torch.Tensor, num_top: list[int]) -> list[tuple[float, int, list]]:
    """Per row: (log q of the token, its rank, the num_top[i] best alternatives).

    NOTE: each tensor crosses to the host once for the whole batch; a per-row .item() would be a
    device sync per row on a GPU.
    """
    chosen = logq.gather(1, tokens[:, None]).squeeze(1)
    ranks = (logq > chosen[:, None]).sum(dim=-1) + 1
    k = max(num_top, default=0)
    top_ids, top_vals = [[]] * len(num_top), [[]] * len(num_top)
    if k:
        vals, ids = logq.topk(k, dim=-1)
        top_ids, top_vals = ids.tolist(), vals.tolist()
    return [(lp, rank, list(zip(top_ids[i][:n], top_vals[i][:n])))
            for i, (lp, rank, n) in enumerate(zip(chosen.tolist(), ranks.tolist(), num_top))]
