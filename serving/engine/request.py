"""Request, Hypothesis and Sequence: the engine's object model (serving/engine/README.md).

A request holds hypotheses; a hypothesis holds one sequence per stream (`main`, plus `amateur`
for contrastive decoding and `no_context` for context contrast). The scheduler and the runner
see only sequences; the gang rule makes all sequences of a request move together.
"""

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from counterpoint.decoding import SamplingParams
from counterpoint.decoding.beam import BeamSearch

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One (hypothesis, stream): token ids, a block table in its model's pool, progress."""

    model: str
    token_ids: list[int]
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full, computed blocks

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_remaining(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def fork(self) -> "Sequence":
        return Sequence(self.model, list(self.token_ids), num_computed_tokens=self.num_computed_tokens,
                        block_table=list(self.block_table), block_hashes=list(self.block_hashes))


@dataclass(slots=True, eq=False)
class Hypothesis:
    """One candidate continuation, with the per-token record the client asked for."""

    index: int
    seqs: dict[str, Sequence]  # by stream name; empty once finished in beam search
    output_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    decoding_info: list[dict] = field(default_factory=list)
    text: str = ""
    detok: object = None  # IncrementalDetokenizer, set by the engine
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: object = None  # xgrammar matcher of a structured request: its state after output_ids

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self, index: int, with_seqs: bool = True) -> "Hypothesis":
        return Hypothesis(
            index=index, seqs={name: s.fork() for name, s in self.seqs.items()} if with_seqs else {},
            output_ids=list(self.output_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs), decoding_info=list(self.decoding_info), text=self.text,
            detok=self.detok.fork() if self.detok else None, grammar=self.grammar.fork() if self.grammar else None,
        )


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...]
    max_tokens: int
    streams: dict[str, str]  # stream name -> model slot
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    hypotheses: list[Hypothesis] = field(default_factory=list)  # live ones
    finished: list[Hypothesis] = field(default_factory=list)
    generator: torch.Generator | None = None
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    beam: BeamSearch | None = None
    error: str | None = None  # why the request ended early, when its decoding failed
    stream_prompts: dict[str, list[int]] = field(default_factory=dict)  # a stream's own prompt (no_context)

    def __post_init__(self):
        if not self.hypotheses:
            seqs = {stream: Sequence(model, list(self.stream_prompts.get(stream, self.prompt_token_ids)))
                    for stream, model in self.streams.items()}
            self.hypotheses = [Hypothesis(0, seqs)]
        if self.params.use_beam_search and self.beam is None:
            p = self.params
            self.beam = BeamSearch(p.beam_width, p.length_penalty, p.early_stopping, self.max_tokens)

    @property
    def model(self) -> str:
        """The model slot of the main stream."""
        return self.streams["main"]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_children(self) -> int:
        """Hypotheses the request runs at once: best_of (or n) for parallel sampling."""
        return self.params.best_of or self.params.n

    def sequences(self) -> list[Sequence]:
        return [s for h in self.hypotheses for s in h.seqs.values()]
