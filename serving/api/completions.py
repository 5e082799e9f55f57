"""The generation routes, /v1/completions and /v1/chat/completions, and the bridge from an engine
stream to one JSON body or a server-sent event stream."""

import asyncio
import uuid

from fastapi import APIRouter, Request

from counterpoint.serving.api import responses as R
from counterpoint.serving.api.async_engine import QueueFull, StepFailed, Unavailable
from counterpoint.serving.api.chat_template import chat_prompt
from counterpoint.serving.api.errors import APIError
from counterpoint.serving.api.protocol import ChatCompletionRequest, CompletionRequest
from counterpoint.serving.api.state import state
from counterpoint.serving.api.streaming import sse, stream_chat, stream_completion
from counterpoint.serving.engine.admission import ContextLengthExceeded

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    params = _params(body)
    prompts = _or_400(body.prompts, "prompt")
    streams = [await _started(server.engine.generate(p, params, "cmpl", body.model), "prompt") for p in prompts]
    rid = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        return sse(stream_completion(rid, body, params, streams, body.model, tokenizer))
    finals = await asyncio.gather(*[_last(s, request) for s in streams])
    choices = [R.completion_choice(i * body.n + o.index, out, o, body, tokenizer)
               for i, out in enumerate(finals) for o in out.outputs]
    return {**R.envelope("text_completion", rid, body.model, choices),
            "usage": R.usage(sum(len(o.prompt_token_ids) for o in finals), R.num_completion_tokens(finals))}


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    params = _params(body)
    prompt = chat_prompt(tokenizer, body.message_dicts(), tokenize=False)
    stream = await _started(server.engine.generate(prompt, params, "chat", body.model), "messages")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return sse(stream_chat(rid, body, params, stream, body.model))
    out = await _last(stream, request)
    choices = [R.chat_choice(o, body) for o in out.outputs]
    return {**R.envelope("chat.completion", rid, body.model, choices),
            "usage": R.usage(len(out.prompt_token_ids), R.num_completion_tokens([out]))}


def _or_400(fn, param: str):
    try:
        return fn()
    except ValueError as err:
        raise APIError(400, str(err), param=param) from err


def _params(body):
    try:
        return body.to_sampling_params()
    except NotImplementedError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0], code="not_supported") from err
    except ValueError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from err


class _Started:
    """An engine stream whose first output has arrived (so errors surface before any header)."""

    def __init__(self, gen, first):
        self.gen, self.first = gen, first

    async def __aiter__(self):
        yield self.first
        if not self.first.finished:
            async for out in self.gen:
                yield out

    async def aclose(self):
        await self.gen.aclose()


async def _started(gen, prompt_field: str) -> _Started:
    """`prompt_field` names the field a too-long prompt came in: prompt or messages."""
    try:
        return _Started(gen, await gen.__anext__())
    except ContextLengthExceeded as err:
        raise APIError(400, str(err), param=prompt_field, code="context_length_exceeded") from err
    except NotImplementedError as err:
        raise APIError(400, str(err), code="not_supported") from err
    except ValueError as err:
        raise APIError(400, str(err), param=getattr(err, "param", None)) from err
    except QueueFull as err:
        raise APIError(429, str(err), "rate_limit_error", code="queue_full") from err
    except Unavailable as err:
        raise APIError(503, str(err), "service_unavailable") from err
    except StepFailed as err:
        raise APIError(500, str(err), "internal_error") from err


async def _last(stream: _Started, request: Request):
    """The final output; a client that goes away aborts the request (freeing its blocks)."""
    out = None
    try:
        async for out in stream:
            if await request.is_disconnected():
                break
    except StepFailed as err:
        raise APIError(500, str(err), "internal_error") from err
    finally:
        await stream.aclose()
    if out is None or not out.finished:
        raise APIError(499, "client disconnected")
    return out
