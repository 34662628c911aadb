"""What our HTTP APIs share — the coordinator's, node serving endpoints', the gateway's: errors in
OpenAI's shape (``{"error": {"message", "type", "param", "code"}}`` with a fitting status) and
an ``x-request-id`` on every response.

>>> e = APIError(404, "no model 'x'", "model_not_found", "model")
>>> e.body()["error"]["type"]
'not_found_error'
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by an endpoint; the app's handler turns it into the JSON body and status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.code, self.param, TYPES.get(self.status, "api_error"))


def error_body(
    message: str, code: str, param: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """``(message, param)`` for the first of pydantic's request-validation errors."""
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return f"{param or 'body'}: {first['msg']}", param


def install_error_handlers(app: Any) -> None:
    """Answer ``APIError`` and FastAPI's request-validation errors in OpenAI's shape (the
    latter as 400 ``invalid_request``), for every one of our FastAPI apps."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def api_error(_: Any, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def invalid(_: Any, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(message, "invalid_request", param), status_code=400)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)


class RequestIdMiddleware:
    """ASGI middleware: ``x-request-id`` on every response (the caller's, or a new one), and
    ``on_status(status)`` for metrics.

    Pure ASGI rather than FastAPI's ``@app.middleware("http")``: Starlette's
    ``BaseHTTPMiddleware`` costs about a millisecond per request (measured in the gateway)."""

    def __init__(self, app: Any, on_status: Callable[[int], None] | None = None) -> None:
        self.app, self.on_status = app, on_status
        self.prefix = secrets.token_hex(8)  # unique per process; a counter within it
        self.counter = itertools.count()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = given or f"req-{self.prefix}{next(self.counter):08x}".encode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
                if self.on_status is not None:
                    self.on_status(message["status"])
            await send(message)

        await self.app(scope, receive, send_with_id)
