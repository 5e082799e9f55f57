"""From engine outputs to an HTTP answer: start a request's engine streams together, map engine
errors to statuses, wait for the final outputs, and cancel everything when the client leaves."""

import asyncio
import contextlib

from fastapi import Request

from counterpoint.serving.api.async_engine import QueueFull, StepFailed, Unavailable
from counterpoint.serving.api.errors import APIError
from counterpoint.serving.engine.admission import ContextLengthExceeded

DISCONNECT_POLL_S = 0.25


class Started:
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


async def start_all(gens: list, request: Request, fields: dict[str, str]) -> list[Started]:
    """Submit every engine stream at once and wait for their first outputs. If one fails, or the
    client leaves meanwhile, every stream is closed (each close aborts its request in the engine).
    `fields` maps the engine's names for too-long input ("prompt", "max_tokens") to the body's."""
    tasks = [asyncio.ensure_future(gen.__anext__()) for gen in gens]
    try:
        async with _cancel_on_disconnect(request, tasks):
            firsts = await asyncio.gather(*tasks)
    except BaseException as err:
        await _close(tasks, gens)
        raise _as_api_error(err, fields) from err
    return [Started(gen, first) for gen, first in zip(gens, firsts)]


async def last_all(streams: list[Started], request: Request) -> list:
    """The final output of every stream; a client that leaves aborts them all (freeing blocks)."""
    tasks = [asyncio.ensure_future(_last(stream)) for stream in streams]
    try:
        async with _cancel_on_disconnect(request, tasks):
            return await asyncio.gather(*tasks)
    except StepFailed as err:
        raise APIError(err.status, str(err), err.err_type) from err
    except asyncio.CancelledError as err:
        raise APIError(499, "client disconnected") from err
    finally:
        await _close(tasks, streams)


async def _close(tasks: list, streams: list) -> None:
    """Cancel the tasks, let them unwind (a cancelled engine stream aborts its request), then close
    the streams that were not running."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*[stream.aclose() for stream in streams], return_exceptions=True)


async def _last(stream: Started):
    out = None
    async for out in stream:
        pass
    return out


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, tasks: list):
    """Cancel `tasks` as soon as the client disconnects. NOTE: nothing else notices a client that
    leaves while its requests wait in the queue, producing no output to write."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for task in tasks:
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()


def _as_api_error(err: BaseException, fields: dict[str, str]) -> BaseException:
    if isinstance(err, ContextLengthExceeded):
        return APIError(400, str(err), param=fields.get(err.param, err.param), code="context_length_exceeded")
    if isinstance(err, NotImplementedError):
        return APIError(400, str(err), code="not_supported")
    if isinstance(err, ValueError):
        return APIError(400, str(err), param=getattr(err, "param", None))
    if isinstance(err, QueueFull):
        return APIError(429, str(err), "rate_limit_error", code="queue_full")
    if isinstance(err, Unavailable):
        return APIError(503, str(err), "service_unavailable")
    if isinstance(err, StepFailed):
        return APIError(err.status, str(err), err.err_type)
    if isinstance(err, asyncio.CancelledError):
        return APIError(499, "client disconnected")
    return err
