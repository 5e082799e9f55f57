"""The generation routes, /v1/completions and /v1/chat/completions: body to SamplingParams,
prompts tokenized off the event loop, engine streams to one JSON body or a server-sent event
stream."""

import uuid

from fastapi import APIRouter, Request

from counterpoint.serving.api import responses as R
from counterpoint.serving.api.chat_template import chat_prompt
from counterpoint.serving.api.engine_streams import last_all, start_all
from counterpoint.serving.api.errors import APIError
from counterpoint.serving.api.protocol import ChatCompletionRequest, CompletionRequest
from counterpoint.serving.api.state import state
from counterpoint.serving.api.streaming import sse, stream_chat, stream_completion

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    params = _params(body)
    prompts = _or_400(body.prompts, "prompt")
    ids = await server.off_loop(lambda: [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts])
    gens = [server.engine.generate(text, params, "cmpl", body.model, prompt_token_ids=prompt_ids)
            for text, prompt_ids in zip(prompts, ids)]
    streams = await start_all(gens, request, {"prompt": "prompt", "max_tokens": "max_tokens"})
    rid = f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        return sse(stream_completion(rid, body, params, streams, body.model, tokenizer))
    finals = await last_all(streams, request)
    choices = [R.completion_choice(i * body.n + o.index, out, o, body, tokenizer)
               for i, out in enumerate(finals) for o in out.outputs]
    return {**R.envelope("text_completion", rid, body.model, choices),
            "usage": R.usage(sum(len(o.prompt_token_ids) for o in finals), R.num_completion_tokens(finals))}


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    params = _params(body)
    prompt = await server.off_loop(chat_prompt, tokenizer, body.message_dicts(), tokenize=False)
    ids = await server.off_loop(tokenizer.encode, prompt)
    gen = server.engine.generate(prompt, params, "chat", body.model, prompt_token_ids=ids)
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    [stream] = await start_all([gen], request, {"prompt": "messages", "max_tokens": max_field})
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return sse(stream_chat(rid, body, params, stream, body.model))
    [out] = await last_all([stream], request)
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
