"""Server-sent event streams for completions and chat: deltas per choice, stop-string holdback,
logprobs and decoding info per chunk, usage in the last chunk, `data: [DONE]` at the end."""

import asyncio
import json
import time

from fastapi.responses import StreamingResponse

from counterpoint.serving.api import responses as R
from counterpoint.serving.api.async_engine import StepFailed
from counterpoint.serving.api.errors import error_body


def sse(gen) -> StreamingResponse:
    async def lines():
        try:
            async for chunk in gen:
                yield f"data: {json.dumps(chunk)}\n\n"
        except StepFailed as err:  # NOTE: headers are sent; the error travels as an event, as in vLLM
            yield f"data: {json.dumps(error_body(str(err), err.err_type))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


async def _merge(streams):
    """Interleave several engine streams as (stream index, output)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except StepFailed as err:  # handed to the consumer, which raises it
            await queue.put((i, err))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await queue.get()
            if isinstance(out, StepFailed):
                raise out
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            await s.aclose()


async def stream_completion(rid, body, params, streams, model, tokenizer):
    created, last = int(time.time()), {}
    chars_sent, tokens_sent, ended = {}, {}, set()  # per (prompt index, choice index)
    for chunk in _echo_first(body, streams, tokenizer):
        yield R.envelope("text_completion", rid, model, [chunk], created)
    async for i, out in _merge(streams):
        last[i] = out
        for o in out.outputs:
            key = (i, o.index)
            text, start_tok = R.stream_text(o, params.stop_strings), tokens_sent.get(key, 0)
            delta = text[chars_sent.get(key, 0):]
            if key in ended or (not delta and o.finish_reason is None):
                continue  # NOTE: tokens without text yet go out, logprobs and all, with the next chunk
            chars_sent[key], tokens_sent[key] = len(text), len(o.token_ids)
            if o.finish_reason is not None:
                ended.add(key)  # NOTE: a finished choice stays in later outputs; its end goes out once
            choice = {"index": i * body.n + o.index, "text": delta, "finish_reason": o.finish_reason,
                      "logprobs": R.completion_logprobs(o.logprobs[start_tok:], o.token_ids[start_tok:], tokenizer)
                      if body.logprobs is not None else None}
            if body.return_decoding_info:
                choice["decoding_info"] = R.decoding_info(o, start_tok)
            yield R.envelope("text_completion", rid, model, [choice], created)
    if body.include_usage:
        finals = list(last.values())
        yield {**R.envelope("text_completion", rid, model, [], created),
               "usage": R.usage(sum(len(o.prompt_token_ids) for o in finals), R.num_completion_tokens(finals))}


def _echo_first(body, streams, tokenizer):
    if not body.echo:
        return []
    chunks = []
    for i, s in enumerate(streams):
        out = s.first
        prompt_text = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)
        for j in range(body.n):
            chunks.append({"index": i * body.n + j, "text": prompt_text, "finish_reason": None, "logprobs": None})
    return chunks


def _tools_chunk(o, body) -> dict:
    """A finished answer to a request with tools, as one chunk: its calls, or its text."""
    message, finish_reason = R.chat_message(o, body)
    if message.get("tool_calls"):
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": message["content"]}
    choice = {"index": o.index, "delta": delta, "finish_reason": finish_reason,
              "logprobs": R.chat_logprobs(o.logprobs, o.token_ids, body.top_logprobs or 0) if body.logprobs else None}
    if body.return_decoding_info:
        choice["decoding_info"] = R.decoding_info(o)
    return choice


async def stream_chat(rid, body, params, stream, model):
    created, sent, tokens_sent, ended, out = int(time.time()), {}, {}, set(), None
    for j in range(body.n):
        yield R.envelope("chat.completion.chunk", rid, model,
                         [{"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], created)
    try:
        async for out in stream:
            for o in out.outputs:
                if body.uses_tools:  # NOTE: held back until the end, when it is known to be a call or text
                    if o.finish_reason is not None and o.index not in ended:
                        ended.add(o.index)
                        yield R.envelope("chat.completion.chunk", rid, model, [_tools_chunk(o, body)], created)
                    continue
                text = R.stream_text(o, params.stop_strings)
                delta, start_tok = text[sent.get(o.index, 0):], tokens_sent.get(o.index, 0)
                if o.index in ended or (not delta and o.finish_reason is None):
                    continue
                sent[o.index], tokens_sent[o.index] = len(text), len(o.token_ids)
                if o.finish_reason is not None:
                    ended.add(o.index)
                choice = {"index": o.index, "delta": {"content": delta} if delta else {},
                          "finish_reason": o.finish_reason,
                          "logprobs": R.chat_logprobs(o.logprobs[start_tok:], o.token_ids[start_tok:],
                                                      body.top_logprobs or 0) if body.logprobs else None}
                if body.return_decoding_info:
                    choice["decoding_info"] = R.decoding_info(o, start_tok)
                yield R.envelope("chat.completion.chunk", rid, model, [choice], created)
    finally:
        await stream.aclose()
    if body.include_usage and out is not None:
        yield {**R.envelope("chat.completion.chunk", rid, model, [], created),
               "usage": R.usage(len(out.prompt_token_ids), R.num_completion_tokens([out]))}
