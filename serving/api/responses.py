"""OpenAI response shapes: completion and chat bodies, stream chunks, logprobs, usage."""

import time

from counterpoint.serving.api.tools import parse_tool_calls
from counterpoint.serving.engine.outputs import CompletionOutput, Logprob, RequestOutput


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(obj: str, request_id: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    return {"id": request_id, "object": obj, "created": created or int(time.time()), "model": model,
            "choices": choices}


def completion_logprobs(entries: list[dict[int, Logprob] | None], token_ids: list[int], tokenizer,
                        text_offset: int = 0) -> dict:
    """The completions API's logprobs: parallel lists of tokens, logprobs, top alternatives, offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = tokenizer.decode([token_id])
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:  # the first prompt token has no logprob
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(json_logprob(entry[token_id].logprob))
        # NOTE: the chosen token is always listed, as OpenAI and vLLM do: up to logprobs + 1 entries.
        top.append({lp.decoded_token: json_logprob(lp.logprob) for lp in entry.values()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], num_top: int) -> dict:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        alternatives = sorted(entry.values(), key=lambda lp: -lp.logprob)[:num_top]
        if num_top and chosen not in alternatives:  # the chosen token is always listed (num_top + 1 at most)
            alternatives.append(chosen)
        content.append({
            "token": chosen.decoded_token, "logprob": json_logprob(chosen.logprob),
            "bytes": list(chosen.decoded_token.encode()),
            "top_logprobs": [{"token": a.decoded_token, "logprob": json_logprob(a.logprob),
                              "bytes": list(a.decoded_token.encode())}
                             for a in alternatives],
        })
    return {"content": content}


def decoding_info(o: CompletionOutput, start: int = 0) -> list[dict] | None:
    if o.decoding_info is None:
        return None
    return [{k: json_logprob(v) if isinstance(v, float) else v for k, v in d.items()} for d in o.decoding_info[start:]]


def json_logprob(value: float) -> float:
    """JSON has no −inf: a token the decoding ruled out (top-k, min-p, a ban) reports −9999.0, as
    vLLM does."""
    return max(value, LOGPROB_FLOOR)


LOGPROB_FLOOR = -9999.0


def stream_text(o: CompletionOutput, stop_strings: list[str]) -> str:
    """Text safe to send now: while running, hold back what could be the start of a stop string."""
    if o.finish_reason is not None or not stop_strings:
        return o.text
    return o.text[: max(0, len(o.text) - max(map(len, stop_strings)) + 1)]


def num_completion_tokens(outputs: list[RequestOutput]) -> int:
    return sum(len(o.token_ids) for out in outputs for o in out.outputs)


def completion_choice(index: int, out: RequestOutput, o: CompletionOutput, body, tokenizer) -> dict:
    """One choice of a completions body; with `echo`, the prompt (and its logprobs) come first."""
    prompt_text = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)
    text = (prompt_text if body.echo else "") + o.text
    logprobs = None
    if body.logprobs is not None:
        entries, ids = list(o.logprobs or []), list(o.token_ids)
        if body.echo:
            entries, ids = list(out.prompt_logprobs or []) + entries, list(out.prompt_token_ids) + ids
        logprobs = completion_logprobs(entries, ids, tokenizer)
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}
    if body.return_decoding_info:
        choice["decoding_info"] = decoding_info(o)
    return choice


def chat_message(o: CompletionOutput, body) -> tuple[dict, str | None]:
    """The assistant message and finish reason: an answer that is a call of an offered function
    becomes `tool_calls` with finish reason "tool_calls"."""
    calls = parse_tool_calls(o.text, body.functions) if body.uses_tools and o.finish_reason == "stop" else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": o.text}, o.finish_reason


def chat_choice(o: CompletionOutput, body) -> dict:
    message, finish_reason = chat_message(o, body)
    choice = {"index": o.index, "message": message,
              "logprobs": chat_logprobs(o.logprobs, o.token_ids, body.top_logprobs or 0) if body.logprobs else None,
              "finish_reason": finish_reason}
    if body.return_decoding_info:
        choice["decoding_info"] = decoding_info(o)
    return choice
