"""What every request passes before any route sees it: the API key, then the body size.

As plain ASGI middleware it runs before the body is parsed, so a request without the key gets a
401 whatever its body, and an oversized body is refused (413) before it is read into memory or
parsed on the event loop.
"""

import hmac
import json

from counterpoint.serving.api.errors import error_body

OPEN_PATHS = {"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
MAX_BODY_BYTES = 8 * 2**20  # about 2 million tokens of text: far past any context, far below trouble


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._has_key(headers):
            return await _error(send, 401, "invalid or missing API key", "authentication_error", "invalid_api_key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _too_large(send, int(declared), self.max_body_bytes)
        body, complete = await _read_body(receive, self.max_body_bytes)
        if not complete:
            return await _too_large(send, None, self.max_body_bytes)
        await self.app(scope, _replay(body, receive), send)

    def _has_key(self, headers: dict) -> bool:
        """`Authorization: Bearer KEY`; the scheme is case-insensitive (RFC 9110), the key compared
        in constant time."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _read_body(receive, limit: int) -> tuple[bytes, bool]:
    """The whole body, or (what was read, False) once it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True  # a disconnect: the app gets what came, fails to parse it, and ends
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return b"", False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # NOTE: after the body, the app only waits here for a disconnect

    return replayed


async def _too_large(send, size: int | None, limit: int) -> None:
    got = f"{size} bytes" if size is not None else "more"
    await _error(send, 413, f"the request body is too large: {got}; the limit is {limit} bytes",
                 "invalid_request_error", "request_too_large")


async def _error(send, status: int, message: str, err_type: str, code: str) -> None:
    body = json.dumps(error_body(message, err_type, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
