"""What every route shares: the server's state on the app, and the key and availability check."""

from dataclasses import dataclass

from fastapi import Request

from counterpoint.serving.api.async_engine import AsyncEngine, Unavailable
from counterpoint.serving.api.errors import APIError


@dataclass(frozen=True)
class ServerState:
    engine: AsyncEngine
    served: list[str]  # the model ids, the default first
    api_key: str | None

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


def check_key(request: Request) -> None:
    """The bearer key when --api-key is set, then a 503 while the engine cannot take work."""
    server = state(request)
    if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
        raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
    try:
        server.engine.check_available()
    except Unavailable as err:
        raise APIError(503, str(err), "service_unavailable") from err
