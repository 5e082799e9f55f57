"""What the engine returns for a request, shaped like vLLM's RequestOutput."""

from dataclasses import dataclass, replace


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    decoding_info: list[dict] | None = None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the request failed alone (its choices end with "error")


def snapshot(out: RequestOutput) -> RequestOutput:
    """A copy whose lists no longer grow with the engine's hypotheses."""
    outputs = [
        replace(o, token_ids=list(o.token_ids), logprobs=None if o.logprobs is None else list(o.logprobs),
                decoding_info=None if o.decoding_info is None else list(o.decoding_info))
        for o in out.outputs
    ]
    prompt_logprobs = None if out.prompt_logprobs is None else list(out.prompt_logprobs)
    return replace(out, outputs=outputs, prompt_logprobs=prompt_logprobs)
