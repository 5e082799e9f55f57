"""Continuous batching: a token budget per step, chunked prefill mixed with decode, gang
scheduling of each request's sequences, and preemption by recompute when blocks run out.
"""

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from counterpoint.serving.engine.kv_manager import KVManager
from counterpoint.serving.engine.request import Request, RequestStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    request: Request
    num_new_tokens: int
    logit_positions: list[int]  # absolute positions whose logits the step must return


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    ready: list[Request] = field(default_factory=list)  # every sequence reaches its end: decode them
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: dict[str, KVManager]):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions: Counter[str] = Counter()  # per model of the preempted request
        # Models whose sequences move in lockstep with their hypothesis's main sequence (tails of
        # a shared trunk: they go on from the rows the main sequence computes in the same step).
        self.lockstep: set[str] = set()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            plan = self._plan(request, budget)
            if plan is None:
                break
            while not self._can_allocate(plan):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
            budget -= self._commit(request, plan, out)
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        num_seqs = Counter(seq.model for r in self.running for seq in r.sequences())  # per model: each runs its batch
        while self.waiting and budget > 0:
            request = self.waiting[0]
            seqs = request.sequences()
            demand = _seq_demand(request)
            if any(num_seqs[model] + k > self.config.max_num_seqs for model, k in demand.items()):
                break
            # NOTE: prompt logprobs need the logits of every prompt position, so no cache hits.
            if request.params.prompt_logprobs is None:
                for seq in seqs:
                    self.kv[seq.model].match_prefix(seq)
                self._align_lockstep(request)
            plan = self._plan(request, budget)
            if plan is None or not self._can_allocate(plan):
                for seq in seqs:
                    self.kv[seq.model].free(seq)
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            num_seqs.update(demand)
            budget -= self._commit(request, plan, out)

    def _plan(self, request: Request, budget: int) -> dict[Sequence, int] | None:
        """New tokens per sequence. Either every sequence reaches its end this step, or none does.

        NOTE: so a request's rows are always decoded together, a partial step stops each
        sequence one token short of its end.
        """
        seqs = request.sequences()
        remaining = [s.num_remaining for s in seqs]
        if sum(remaining) <= budget:
            return dict(zip(seqs, remaining))
        plan = {}
        for hyp in request.hypotheses:
            main = hyp.seqs["main"]
            followers = sum(seq.model in self.lockstep for seq in hyp.seqs.values())
            for seq in hyp.seqs.values():
                if seq.model in self.lockstep:
                    take = plan.get(main, 0)
                else:
                    take = min(seq.num_remaining - 1, budget // (1 + followers) if seq is main else budget)
                if take > 0:
                    plan[seq] = take
                    budget -= take
        return plan or None

    def _align_lockstep(self, request: Request) -> None:
        """A lockstep sequence and its main sequence keep the cache hits both have."""
        for hyp in request.hypotheses:
            main = hyp.seqs["main"]
            for seq in hyp.seqs.values():
                if seq.model in self.lockstep and seq.num_computed_tokens != main.num_computed_tokens:
                    common = min(seq.num_computed_tokens, main.num_computed_tokens)
                    self.kv[seq.model].truncate(seq, common)
                    self.kv[main.model].truncate(main, common)

    def _can_allocate(self, plan: dict[Sequence, int]) -> bool:
        need: dict[str, int] = {}
        for seq, n in plan.items():
            need[seq.model] = need.get(seq.model, 0) + self.kv[seq.model].num_blocks_needed(seq, n)
        return all(self.kv[m].pool.num_free_blocks >= k for m, k in need.items())

    def _commit(self, request: Request, plan: dict[Sequence, int], out: SchedulerOutput) -> int:
        is_ready = all(plan.get(s, 0) == s.num_remaining for s in request.sequences())
        for seq, n in plan.items():
            copies = self.kv[seq.model].allocate(seq, n)
            out.block_copies.setdefault(seq.model, []).extend(copies)
            out.scheduled.append(ScheduledSeq(seq, request, n, self._logit_positions(request, seq, n, is_ready)))
        if is_ready:
            out.ready.append(request)
        return sum(plan.values())

    def _logit_positions(self, request: Request, seq: Sequence, n: int, is_ready: bool) -> list[int]:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        positions = []
        if request.params.prompt_logprobs is not None and seq is request.hypotheses[0].seqs["main"]:
            # Position p predicts prompt token p + 1; skip those already recorded before a preemption.
            first = max(start, len(request.prompt_logprobs) - 1)
            positions = list(range(first, min(end, request.num_prompt_tokens - 1)))
        if is_ready and (not positions or positions[-1] != end - 1):
            positions.append(end - 1)
        return positions

    def _preempt(self, request: Request) -> None:
        for seq in request.sequences():
            self.kv[seq.model].free(seq)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.preemptions[request.model] += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Free a finished or aborted request's blocks and forget it."""
        for seq in request.sequences():
            self.kv[seq.model].free(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED


def _seq_demand(request: Request) -> Counter:
    """Sequences the request will hold on each model once its hypotheses have forked."""
    per_model = Counter(seq.model for seq in request.sequences())
    return Counter({model: max(k, request.num_children) for model, k in per_model.items()})
