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
from counterpoint.serving.api.tools import render_messages
from counterpoint.serving.engine.documents import chat_with_documents, prompt_with_documents

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    params = params_or_400(body)
    prompts = or_400(body.prompts, "prompt")
    rendered = await server.off_loop(_render_completions, prompts, body.documents, params, tokenizer)
    gens = [server.engine.generate(text, params, "cmpl", body.model, prompt_token_ids=ids, no_context=no_context)
            for text, ids, no_context in rendered]
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
    params = params_or_400(body)
    functions = body.functions if body.uses_tools else []
    prompt, ids, no_context = await server.off_loop(render_chat, body.message_dicts(), body.documents, params,
                                                    tokenizer, functions)
    gen = server.engine.generate(prompt, params, "chat", body.model, prompt_token_ids=ids, no_context=no_context)
    max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    [stream] = await start_all([gen], request, {"prompt": "messages", "max_tokens": max_field})
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return sse(stream_chat(rid, body, params, stream, body.model))
    [out] = await last_all([stream], request)
    choices = [R.chat_choice(o, body) for o in out.outputs]
    return {**R.envelope("chat.completion", rid, body.model, choices),
            "usage": R.usage(len(out.prompt_token_ids), R.num_completion_tokens([out]))}


def _render_completions(prompts: list, documents: list[str] | None, params, tokenizer) -> list[tuple]:
    """Per prompt: (the prompt with the documents, its token ids, token ids without them or None)."""
    rendered = []
    for prompt in prompts:
        full = prompt_with_documents(prompt, documents, tokenizer) if documents else prompt
        ids = tokenizer.encode(full) if isinstance(full, str) else list(full)
        no_context = None
        if params.context_contrast is not None:
            no_context = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rendered.append((full, ids, no_context))
    return rendered


def render_chat(messages: list[dict], documents: list[str] | None, params, tokenizer, functions: list[dict]) -> tuple:
    """(prompt text with the documents, its token ids, token ids without the documents or None)."""
    extra = {}
    if functions or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
        messages, extra = or_400(lambda: render_messages(messages, functions, tokenizer), "messages")
    if documents:
        try:
            with_docs, documents_extra = chat_with_documents(messages, documents, tokenizer)
            extra = {**extra, **documents_extra}
        except ValueError as err:
            raise APIError(400, f"documents: {err}", param="documents") from err
    else:
        with_docs = messages
    prompt = chat_prompt(tokenizer, with_docs, tokenize=False, **extra)
    no_context = None
    if params.context_contrast is not None:
        tools = {"tools": extra["tools"]} if "tools" in extra else {}
        no_context = tokenizer.encode(chat_prompt(tokenizer, messages, tokenize=False, **tools))
    return prompt, tokenizer.encode(prompt), no_context


def or_400(fn, param: str):
    try:
        return fn()
    except ValueError as err:
        raise APIError(400, str(err), param=param) from err


def params_or_400(body):
    try:
        return body.to_sampling_params()
    except NotImplementedError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0], code="not_supported") from err
    except ValueError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from err
