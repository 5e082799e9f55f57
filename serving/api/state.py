"""What every route shares: the server's state on the app, and the key and availability check."""

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from counterpoint.serving.api.async_engine import AsyncEngine, Unavailable
from counterpoint.serving.api.errors import APIError


@dataclass(frozen=True)
class ServerState:
    engine: AsyncEngine
    served: list[str]  # the model ids, the default first
    api_key: str | None
    # NOTE: tokenizing (and rendering chat templates) runs here, off the event loop and the engine
    # thread, so a huge prompt delays no one else's request. One worker, because a tokenizer
    # object is not safe to use from several threads at once.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tokenize"))

    async def off_loop(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, functools.partial(fn, *args, **kwargs))

    def tokenizer(self, name: str | None):
        """The tokenizer of a served model (None: the default one), or a 404."""
        name = name or self.served[0]
        if name not in self.served:
            raise APIError(404, f"model {name!r} does not exist; served: {', '.join(self.served)}", param="model",
                           code="model_not_found")
        return self.engine.engine.slots[name].tokenizer

    def max_model_len(self, name: str | None) -> int:
        return self.engine.engine.slots[name or self.served[0]].max_model_len


def state(request: Request) -> ServerState:
    return request.app.state.server


def check_available(request: Request) -> None:
    """A 503 while the engine cannot take work (loading, shutting down, failed). The API key is
    checked before this, by the Guard middleware."""
    try:
        state(request).engine.check_available()
    except Unavailable as err:
        raise APIError(503, str(err), "service_unavailable") from err
