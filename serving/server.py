"""The OpenAI-compatible HTTP server (API.md): FastAPI routes over the AsyncEngine."""

import asyncio
import contextlib
import time
import uuid

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from counterpoint.serving import responses as R
from counterpoint.serving.streaming import sse, stream_chat, stream_completion
from counterpoint.serving.async_engine import AsyncEngine, QueueFull, StepFailed, Unavailable
from counterpoint.serving.engine import ContextLengthExceeded
from counterpoint.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest, error_body)


class APIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, err_type, param, code)


def build_app(engine: AsyncEngine, served: list[str], api_key: str | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """`served`: the model ids, the default first (the engine loads them under these names)."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn has already waited for open connections; drain what is left, then stop the loop.
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="Counterpoint", lifespan=lifespan)
    app.state.engine, app.state.served = engine, served
    _install_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        try:
            engine.check_available()
        except Unavailable as err:
            raise APIError(503, str(err), "service_unavailable") from err

    def check_model(name: str):
        """The tokenizer of a served model, or a 404."""
        if name not in served:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(served)}", param="model",
                           code="model_not_found")
        return engine.engine.slots[name].tokenizer

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=200 if engine.is_alive else 503)

    @app.get("/metrics")
    async def metrics():
        if engine.metrics is None:
            raise APIError(404, "metrics are off for this server")
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        cards = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "counterpoint",
                  "max_model_len": engine.engine.slots[name].max_model_len} for name in served]
        return {"object": "list", "data": cards}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(body: TokenizeRequest):
        tokenizer = check_model(body.model)
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            ids = _chat_prompt(tokenizer, messages, tokenize=True, return_dict=False)
        elif body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "tokenize needs prompt or messages", param="prompt")
        return {"tokens": list(ids), "count": len(ids), "max_model_len": engine.engine.slots[body.model].max_model_len}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(body: DetokenizeRequest):
        tokenizer = check_model(body.model)
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        tokenizer = check_model(body.model)
        params = _params(body)
        prompts = _or_400(body.prompts)
        streams = [await _started(engine.generate(p, params, "cmpl", body.model)) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return sse(stream_completion(rid, body, params, streams, body.model, tokenizer))
        finals = await asyncio.gather(*[_last(s, request) for s in streams])
        choices = [_completion_choice(i * body.n + o.index, out, o, body, tokenizer)
                   for i, out in enumerate(finals) for o in out.outputs]
        return {**R.envelope("text_completion", rid, body.model, choices),
                "usage": R.usage(sum(len(o.prompt_token_ids) for o in finals), R.num_completion_tokens(finals))}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatCompletionRequest, request: Request):
        tokenizer = check_model(body.model)
        params = _params(body)
        prompt = _chat_prompt(tokenizer, body.message_dicts(), tokenize=False)
        stream = await _started(engine.generate(prompt, params, "chat", body.model))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return sse(stream_chat(rid, body, params, stream, body.model))
        out = await _last(stream, request)
        choices = [_chat_choice(o, body) for o in out.outputs]
        return {**R.envelope("chat.completion", rid, body.model, choices),
                "usage": R.usage(len(out.prompt_token_ids), R.num_completion_tokens([out]))}

    return app


def _or_400(fn):
    try:
        return fn()
    except ValueError as err:
        raise APIError(400, str(err)) from err


def _chat_prompt(tokenizer, messages: list[dict], **kwargs):
    """The model's chat template over the messages; a template that refuses them is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except (ValueError, TypeError, jinja2.TemplateError) as err:
        raise APIError(400, f"messages: the chat template refused them: {err}", param="messages") from err


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


async def _started(gen) -> _Started:
    try:
        return _Started(gen, await gen.__anext__())
    except ContextLengthExceeded as err:
        raise APIError(400, str(err), param="messages", code="context_length_exceeded") from err
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


def _completion_choice(index, out, o, body, tokenizer) -> dict:
    prompt_text = out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)
    text = (prompt_text if body.echo else "") + o.text
    logprobs = None
    if body.logprobs is not None:
        entries, ids = list(o.logprobs or []), list(o.token_ids)
        if body.echo:
            entries, ids = list(out.prompt_logprobs or []) + entries, list(out.prompt_token_ids) + ids
        logprobs = R.completion_logprobs(entries, ids, tokenizer)
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}
    if body.return_decoding_info:
        choice["decoding_info"] = R.decoding_info(o)
    return choice


def _chat_choice(o, body) -> dict:
    choice = {"index": o.index, "message": {"role": "assistant", "content": o.text},
              "logprobs": R.chat_logprobs(o.logprobs, o.token_ids, body.top_logprobs or 0) if body.logprobs else None,
              "finish_reason": o.finish_reason}
    if body.return_decoding_info:
        choice["decoding_info"] = R.decoding_info(o)
    return choice


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        field = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{field}: {first.get('msg', 'invalid request')}", param=field),
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal(_, err: Exception):
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
