"""Beam search with transformers' semantics (decoding/README.md, "Select").

One `BeamSearch` per request holds the running beams' scores, the `width` finished slots and the
early-stopping state. Each step takes the processed log q of the running beams and returns which
candidates run on and which enter the finished slots. The arithmetic mirrors transformers'
vectorised beam search (float32, the ±1e9 sentinels, top-k order), so ties resolve the same way.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NEG = -1.0e9  # transformers' sentinel for "not a candidate"


@dataclass(slots=True)
class Candidate:
    parent: int  # index of the running beam it extends
    token_id: int
    logprob: float  # log q of the token
    score: float  # running score after the token (the sum of log q; NEG-offset for a forced-running stop)


@dataclass(slots=True)
class BeamStep:
    running: list[Candidate]  # the beams of the next step, best first
    done: bool  # the search is over: the finished slots hold the results


@dataclass
class BeamSearch:
    width: int
    length_penalty: float
    early_stopping: bool | str
    max_tokens: int
    running_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    finished_scores: torch.Tensor = field(init=False)  # (width,) length-penalised scores of the slots
    finished_real: torch.Tensor = field(init=False)  # (width,) which slots hold a finished hypothesis
    finished: list = field(init=False)  # payloads of the slots (None where empty)
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied

    def __post_init__(self):
        self.finished_scores = torch.full((self.width,), NEG)
        self.finished_real = torch.zeros(self.width, dtype=torch.bool)
        self.finished = [None] * self.width

    def step(self, logq: torch.Tensor, num_generated: int, hits_stop: Callable[[int, int], bool],
             make_finished: Callable[[Candidate], object]) -> BeamStep:
        """logq: (beams, V) for the running beams in order; num_generated: tokens each already has.

        hits_stop(parent, token) says whether the candidate ends the hypothesis (EOS, a stop
        token, the length limit); make_finished builds the payload kept in a finished slot.
        """
        top_scores, candidates = self._top_candidates(logq)
        hits = torch.tensor([hits_stop(c.parent, c.token_id) for c in candidates])
        running = self._next_running(top_scores, candidates, hits)
        self._update_finished(top_scores, candidates, hits, num_generated + 1, make_finished)
        self.running_scores = torch.tensor([c.score for c in running], dtype=torch.float32)
        self._update_improvable(num_generated + 1)
        all_full = bool(self.finished_real.all())
        done = not self.improvable or (all_full and self.early_stopping is True) or bool(hits.all())
        return BeamStep(running, done)

    def results(self) -> list:
        """Finished payloads, best first."""
        return [p for p, real in zip(self.finished, self.finished_real.tolist()) if real]

    def _top_candidates(self, logq: torch.Tensor) -> tuple[torch.Tensor, list[Candidate]]:
        """The 2·width best (beam, token) continuations by running score, best first."""
        logq = logq.float()
        scores = logq + self.running_scores[:, None].to(logq.device)
        vocab = scores.shape[1]
        top_scores, top_idx = scores.flatten().topk(min(2 * self.width, scores.numel()))
        parents, tokens = top_idx // vocab, top_idx % vocab
        # NOTE: one transfer to the host (one device sync); float64 holds every field exactly.
        fields = [parents, tokens, logq[parents, tokens], top_scores]
        host = torch.stack([f.double() for f in fields]).cpu()
        top_scores = host[3].float()
        return top_scores, [Candidate(int(p), int(t), lq, s) for p, t, lq, s in zip(*host.tolist())]

    def _next_running(self, top_scores, candidates, hits) -> list[Candidate]:
        # NOTE: a candidate that stops cannot run on, unless fewer than `width` others exist;
        # then it runs with a NEG-offset score, exactly as in transformers.
        keyed = top_scores + hits.float() * NEG
        order = keyed.topk(min(self.width, len(candidates))).indices.tolist()
        return [Candidate(candidates[i].parent, candidates[i].token_id, candidates[i].logprob, float(keyed[i]))
                for i in order]

    def _update_finished(self, top_scores, candidates, hits, length, make_finished) -> None:
        eligible = hits & (torch.arange(len(candidates)) < self.width)
        scores = penalised(top_scores, length, self.length_penalty)
        if self.early_stopping is True and bool(self.finished_real.all()):
            scores = scores + NEG
        if not self.improvable:
            scores = scores + NEG
        scores = scores + (~eligible).float() * NEG
        merged = torch.cat([self.finished_scores, scores])
        keep = merged.topk(self.width).indices.tolist()
        payloads, real = self.finished + [None] * len(candidates), torch.cat([self.finished_real, eligible])
        for i in keep:
            if i >= self.width and real[i]:
                payloads[i] = make_finished(candidates[i - self.width])
        self.finished = [payloads[i] for i in keep]
        self.finished_scores, self.finished_real = merged[keep], real[keep]

    def _update_improvable(self, length: int) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_tokens
        best_running = penalised(self.running_scores[:1], length, self.length_penalty)
        worst = torch.where(self.finished_real, self.finished_scores.min(), NEG)
        self.improvable = self.improvable and bool((best_running > worst).any())


def penalised(scores: torch.Tensor, length: int, length_penalty: float) -> torch.Tensor:
    """scores / length**length_penalty, for any finite penalty. NOTE: the factor is capped at
    e^±80 (exact below |penalty·ln length| = 80), so it cannot overflow, and the result is kept
    well above the NEG sentinel, so an extreme penalty can neither push a finished beam out of its
    slot in favour of an empty one nor end the search before any beam has finished."""
    exponent = max(-80.0, min(80.0, length_penalty * math.log(length)))
    return (scores / math.exp(exponent)).clamp(min=NEG / 10)
