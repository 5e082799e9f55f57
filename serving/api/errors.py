"""OpenAI's error JSON for every failure the HTTP API answers: `{"error": {message, type, param,
code}}`, never a stack trace."""

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class APIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, err_type, param, code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        """Unknown routes (404) and methods (405), in the same shape as every other error."""
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(error_body(message), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        field = first.get("ctx", {}).get("field") or ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if field and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"
        return JSONResponse(error_body(message, param=field), status_code=400)

    @app.exception_handler(Exception)
    async def internal(_, err: Exception):
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
