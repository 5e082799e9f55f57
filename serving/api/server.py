"""The OpenAI-compatible HTTP server: the FastAPI app over the AsyncEngine, and the service
routes (health, metrics, models, tokenize); the generation routes are in completions.py."""

import asyncio
import contextlib
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from counterpoint.serving.api.async_engine import AsyncEngine
from counterpoint.serving.api.chat_template import chat_prompt
from counterpoint.serving.api.completions import router as completions_router
from counterpoint.serving.api.responses_api import router as responses_router
from counterpoint.serving.api.errors import APIError, install_error_handlers
from counterpoint.serving.api.protocol import DetokenizeRequest, TokenizeRequest
from counterpoint.serving.api.guard import Guard
from counterpoint.serving.api.state import ServerState, check_available, state


router = APIRouter()
available = [Depends(check_available)]


@router.get("/health")
async def health(request: Request):
    return JSONResponse({}, status_code=200 if state(request).engine.is_alive else 503)


@router.get("/metrics")
async def metrics(request: Request):
    metrics = state(request).engine.metrics
    if metrics is None:
        raise APIError(404, "metrics are off for this server")
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _card(server: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "counterpoint",
            "max_model_len": server.max_model_len(name)}


@router.get("/v1/models", dependencies=available)
async def models(request: Request):
    server = state(request)
    return {"object": "list", "data": [_card(server, name) for name in server.served]}


@router.get("/v1/models/{model_id:path}", dependencies=available)
async def model(model_id: str, request: Request):
    server = state(request)
    if model_id not in server.served:
        raise APIError(404, f"model {model_id!r} is not served; served: {', '.join(server.served)}", param="model",
                       code="model_not_found")
    return _card(server, model_id)


@router.post("/tokenize", dependencies=available)
@router.post("/v1/tokenize", dependencies=available)
async def tokenize(body: TokenizeRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    if body.messages is not None:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        ids = await server.off_loop(chat_prompt, tokenizer, messages, tokenize=True, return_dict=False)
    elif body.prompt is not None:
        ids = await server.off_loop(tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        raise APIError(400, "tokenize needs prompt or messages", param="prompt")
    return {"tokens": list(ids), "count": len(ids), "max_model_len": server.max_model_len(body.model)}


@router.post("/detokenize", dependencies=available)
@router.post("/v1/detokenize", dependencies=available)
async def detokenize(body: DetokenizeRequest, request: Request):
    server = state(request)
    tokenizer = server.tokenizer(body.model)
    vocab = len(tokenizer)
    outside = [t for t in body.tokens if not 0 <= t < vocab]
    if outside:
        raise APIError(400, f"tokens: ids must be in [0, {vocab}); got {outside[0]}", param="tokens")
    return {"prompt": await server.off_loop(tokenizer.decode, body.tokens)}


def build_app(engine: AsyncEngine, served: list[str], api_key: str | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """`served`: the model ids, the default first (the engine loads them under these names)."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn has already waited for open connections; drain what is left, then stop the loop.
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="Counterpoint", lifespan=lifespan)
    app.state.server = ServerState(engine, served, api_key)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(completions_router, dependencies=available)
    app.include_router(responses_router, dependencies=available)
    app.add_middleware(Guard, api_key=api_key)
    return app
