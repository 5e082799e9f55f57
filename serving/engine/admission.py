"""Admission checks: what a request must satisfy before it is queued, with errors that name the
field. NOTE: anything that slips through here would fail inside a step, for the whole batch."""

from counterpoint.decoding import SamplingParams
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.model_slot import ModelSlot


class ContextLengthExceeded(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context; `param` is "prompt" when the
    prompt alone is too long, else "max_tokens"."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class InvalidRequest(ValueError):
    """A request the engine cannot run as asked; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def admit(prompts: dict[str, list[int]], streams: dict[str, ModelSlot], params: SamplingParams,
          config: EngineConfig) -> int:
    """Checks the request fits every model it runs on; returns its effective max_tokens.
    `prompts` and `streams` give each stream's prompt ids and model slot; `main` is the longest."""
    ids = prompts["main"]
    if not all(prompts.values()):
        raise InvalidRequest("prompt must not be empty", "prompt")
    _check_fits_batch(streams, params, config.max_num_seqs)
    _check_token_ids(ids, params, min(slot.vocab_size for slot in streams.values()))
    max_model_len = min(slot.max_model_len for slot in streams.values())
    room = max_model_len - len(ids)
    if room <= 0 or (params.max_tokens is not None and params.max_tokens > room):
        raise ContextLengthExceeded(
            f"this model's maximum context length is {max_model_len} tokens; the request has "
            f"{len(ids)} prompt tokens and asks for {params.max_tokens} more", "prompt" if room <= 0 else "max_tokens")
    max_tokens = room if params.max_tokens is None else params.max_tokens
    _check_fits_pools(prompts, streams, max_tokens, params, config.block_size)
    return max_tokens


def _check_fits_batch(streams: dict[str, ModelSlot], params: SamplingParams, max_num_seqs: int) -> None:
    """A request's sequences on one model run in one batch; more than max_num_seqs would wait forever."""
    per_model: dict[str, int] = {}
    for slot in streams.values():
        per_model[slot.name] = per_model.get(slot.name, 0) + params.beam_width
    if params.beam_width > max_num_seqs:
        field = "best_of" if params.best_of else "n"
        raise InvalidRequest(f"{field} must be <= max_num_seqs ({max_num_seqs}): the request's "
                             f"{params.beam_width} hypotheses run in one batch; got {params.beam_width}", field)
    if max(per_model.values()) > max_num_seqs:
        raise InvalidRequest(f"context_contrast runs each of the {params.beam_width} hypotheses twice on the model "
                             f"(with and without the documents), {max(per_model.values())} sequences in one batch, "
                             f"but max_num_seqs is {max_num_seqs}", "context_contrast")


def _check_token_ids(prompt: list[int], params: SamplingParams, vocab: int) -> None:
    """Every token id a request names lies in the vocabulary."""
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab}); got {min(prompt)}..{max(prompt)}", "prompt")
    for field, ids in (("logit_bias", list(params.logit_bias or {})), ("stop_token_ids", params.stop_token_ids or [])):
        outside = [t for t in ids if t >= vocab]
        if outside:
            raise InvalidRequest(f"{field} token ids must be < the vocabulary size {vocab}; got {outside[0]}", field)


def _check_fits_pools(prompts: dict[str, list[int]], streams: dict[str, ModelSlot], max_tokens: int,
                      params: SamplingParams, bs: int) -> None:
    # NOTE: a request that cannot fit a whole pool alone would wait forever; refuse it now. Streams
    # on the same model (main and no_context) share its pool, so their needs add up.
    need: dict[str, int] = {}
    for stream, slot in streams.items():
        need[slot.name] = need.get(slot.name, 0) + _blocks_needed(len(prompts[stream]), max_tokens, params, bs)
    for name, blocks in need.items():
        slot = next(s for s in streams.values() if s.name == name)
        if blocks > slot.kv.pool.num_blocks:
            raise ValueError(
                f"the request needs up to {blocks} KV blocks of {name!r} ({params.beam_width} hypotheses of up to "
                f"{len(prompts['main']) + max_tokens} tokens, {len(streams)} stream(s)) but its cache holds "
                f"{slot.kv.pool.num_blocks}; lower max_tokens or n")


def _blocks_needed(num_prompt: int, max_tokens: int, params: SamplingParams, bs: int) -> int:
    num_children = params.beam_width  # best_of, n or the beam width: the hypotheses that run at once
    if num_children == 1:
        return -(-(num_prompt + max_tokens) // bs)
    # children share the prompt's full blocks, each owns the rest
    return num_prompt // bs + num_children * (-(-(num_prompt % bs + max_tokens) // bs))
