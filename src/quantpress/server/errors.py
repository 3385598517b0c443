"""HTTP errors: one exception type, two body shapes.

TGI routes answer `{"error": "...", "error_type": "validation"}` (the shape huggingface_hub and the
text-generation client map to exception classes); OpenAI routes answer
`{"error": {"message", "type", "code"}}` (what openai-python reads). The status codes are TGI's:
422 validation, 424 generation, 429 overloaded, 503 health; and 413 for a body over the size limit.
Every error, down to an unexpected exception (500), is answered in the route family's shape, and
none of them closes the keep-alive connection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quantpress import errors

log = logging.getLogger(__name__)

# OpenAI `type` for each of our error types; `code` carries our type unchanged
OPENAI_TYPES = {"validation": "invalid_request_error", "template_error": "invalid_request_error",
                "payload_too_large": "invalid_request_error", "not_found": "invalid_request_error",
                "method_not_allowed": "invalid_request_error", "overloaded": "rate_limit_error",
                "generation": "server_error", "healthcheck": "server_error"}
# error types of the HTTP errors starlette and FastAPI raise themselves
HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class ApiError(Exception):
    """A request that ends in an error response; the message is what the client sees."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def invalid(message: str) -> ApiError:
    """TGI's wording for a rejected parameter: "Input validation error: <what>"."""
    return ApiError(422, "validation", f"Input validation error: {message}")


def from_engine(exc: errors.QuantpressError) -> ApiError:
    """Translate what the engine and the chat formatter raise."""
    if isinstance(exc, errors.Overloaded):
        return ApiError(429, "overloaded", "Model is overloaded")
    if isinstance(exc, errors.PromptTooLong):
        return invalid(str(exc))
    if isinstance(exc, errors.TemplateError):
        return ApiError(422, "template_error", f"Template error: {exc}")
    if isinstance(exc, errors.GenerationFailed):
        return ApiError(424, "generation", f"Request failed during generation: {exc}")
    return ApiError(422, "validation", str(exc))


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def tgi_body(err: ApiError) -> dict:
    return {"error": err.message, "error_type": err.error_type}


def openai_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": OPENAI_TYPES.get(err.error_type, "server_error"),
                      "param": None, "code": err.error_type}}


def error_response(path: str, err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = openai_body(err) if is_openai_path(path) else tgi_body(err)
    return JSONResponse(body, status_code=err.status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    """One line for a body that is not JSON or does not fit the schema (axum's wording, as TGI sends it)."""
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        detail = next(p for p in problems if p.get("type") == "json_invalid")
        return f"Failed to parse the request body as JSON: {detail.get('ctx', {}).get('error', detail['msg'])}"
    parts = []
    for p in problems:
        loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {p['msg']}" if loc else p["msg"])
    return "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)


def finite_logprob(value: float | None) -> float | None:
    """JSON has no -inf; clamp as vLLM does so a prompt token the model rules out still serializes."""
    if value is None or math.isfinite(value):
        return value
    return -9999.0


def describe_http_error(exc: HTTPException, max_request_bytes: int) -> ApiError:
    """An HTTP error raised outside our routes: a body over the size limit, an unknown path, ..."""
    if exc.status_code == 413:
        return ApiError(413, "payload_too_large", f"Request body exceeds the limit of {max_request_bytes} bytes "
                        "(max_request_bytes); send a shorter prompt")
    error_type = HTTP_ERROR_TYPES.get(exc.status_code, "validation" if exc.status_code < 500 else "internal")
    return ApiError(exc.status_code, error_type, str(exc.detail))


def install_handlers(app: FastAPI, on_failure: Callable[[str, str, bool], None], max_request_bytes: int) -> None:
    """Answer errors in the body shape of the route family.

    `on_failure(path, error_type, reached_route)` counts them; a body that fails the schema or
    the size limit never reached the route, so the route did not count the request yet.
    """

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        on_failure(request.url.path, exc.error_type, True)
        return error_response(request.url.path, exc)

    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = ApiError(422, "validation", describe_validation(exc))
        on_failure(request.url.path, err.error_type, False)
        return error_response(request.url.path, err)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = describe_http_error(exc, max_request_bytes)
        on_failure(request.url.path, err.error_type, False)
        return error_response(request.url.path, err, headers=exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, bad_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(UnhandledErrors, on_failure=on_failure)


class UnhandledErrors:
    """ASGI middleware: an exception no handler took (a bug, not a bad request) is logged with its
    traceback and answered as a JSON 500 in the route family's shape, and the connection stays
    open. (Starlette's own last resort answers text/plain and re-raises, and uvicorn then drops
    the keep-alive connection.) Once a response has started, nothing valid can follow: re-raised."""

    def __init__(self, app: ASGIApp, on_failure: Callable[[str, str, bool], None]) -> None:
        self.app = app
        self.on_failure = on_failure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:  # noqa: BLE001  the last resort, by design
            if started:
                raise
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            err = ApiError(500, "internal", f"Internal server error: {type(exc).__name__}")
            self.on_failure(scope["path"], err.error_type, True)
            await error_response(scope["path"], err)(scope, receive, send)
