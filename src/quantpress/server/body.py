"""Request bodies as every route reads them: at most max_request_bytes, strict JSON of valid Unicode.

BodySizeLimit refuses a body over the limit with 413 on its Content-Length, before a byte of it is
read, or as soon as a chunked body passes the limit: no oversized body is ever buffered or parsed.
(FastAPI's own `max_body_size` would answer the 413 as plain text, whatever the route family.)
After a large body it returns the freed memory to the OS, so the resident set goes back down.

Python's json accepts what no tokenizer can encode: bytes that are not UTF-8 (json.loads decodes
bytes with "surrogatepass"), and `\\ud800`-style escapes of lone surrogates, which decode to str
values that cannot be encoded as UTF-8. Both would fail deep inside tokenization as a 500. Here
they are a JSON parse error, so FastAPI answers them like any malformed body (422 in the route
family's shape, see errors.describe_validation), as serde_json, behind TGI, refuses them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quantpress.models.skeleton import return_freed_memory

LARGE_BODY = 1 << 20  # bytes: a body this big leaves temporaries worth handing back to the OS


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "Content Too Large")


class BodySizeLimit:
    """ASGI middleware: reading a request body of more than `max_bytes` raises BodyTooLarge in the
    app (whose handler answers 413 in the route family's shape); the connection stays usable, as
    the server discards the rest of the body. After a large body, freed memory goes back to the OS."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        # more digits than 18 exceed any limit (and int() of thousands of digits would refuse to parse)
        too_large = declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if too_large:
                raise BodyTooLarge()  # refused on the header: nothing of it is read
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)
        if received >= LARGE_BODY:
            # Its parse, its tokens and their copies are freed by now, but glibc keeps the freed
            # pages mapped for reuse: without this, RSS stayed ~180 MB up after a few 2 MB
            # prompts (see also app.keep_freed_memory_small). A few ms: not on the event loop.
            await anyio.to_thread.run_sync(return_freed_memory)


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`; json.JSONDecodeError when it is not JSON of valid Unicode text."""
    try:
        text = body.decode("utf-8")  # strict: also refuses UTF-8-encoded surrogates
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"the body is not valid UTF-8 ({e.reason} at byte {e.start})", "", 0) from None
    try:
        value = json.loads(text)
        # one pass in C over every string, keys included
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        code_point = ord(e.object[e.start])
        raise json.JSONDecodeError(f"a \\u escape encodes the lone surrogate U+{code_point:04X}, which is not "
                                   "Unicode text (UTF-16 surrogates come in pairs)", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects are nested too deeply", "", 0) from None
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """An APIRoute whose handler reads the body as StrictJsonRequest (FastAPI's documented way to
    customise request parsing for a router)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_json_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_json_handler
