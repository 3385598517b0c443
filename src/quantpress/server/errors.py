"""HTTP errors: one exception type, two body shapes.

TGI routes answer `{"error": "...", "error_type": "validation"}` (the shape huggingface_hub and the
text-generation client map to exception classes); OpenAI routes answer
`{"error": {"message", "type", "code"}}` (what openai-python reads). The status codes are TGI's:
422 validation, 424 generation, 429 overloaded, 503 health.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from quantpress import errors

# OpenAI `type` for each of our error types; `code` carries our type unchanged
OPENAI_TYPES = {"validation": "invalid_request_error", "template_error": "invalid_request_error",
                "overloaded": "rate_limit_error", "generation": "server_error", "healthcheck": "server_error"}


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


def error_response(path: str, err: ApiError) -> JSONResponse:
    body = openai_body(err) if is_openai_path(path) else tgi_body(err)
    return JSONResponse(body, status_code=err.status)


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


def install_handlers(app: FastAPI, on_failure: Callable[[str, str, bool], None]) -> None:
    """Answer errors in the body shape of the route family.

    `on_failure(path, error_type, reached_route)` counts them; a body that fails the schema never
    reached the route, so the route did not count the request yet.
    """

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        on_failure(request.url.path, exc.error_type, True)
        return error_response(request.url.path, exc)

    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = ApiError(422, "validation", describe_validation(exc))
        on_failure(request.url.path, err.error_type, False)
        return error_response(request.url.path, err)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, bad_body)
