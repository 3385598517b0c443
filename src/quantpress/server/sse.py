"""Server-sent events framing, and responses that stop generating when the client hangs up.

TGI frames events as `data:{json}\\n\\n` (no space, no `[DONE]`); OpenAI as `data: {json}\\n\\n`
ending with `data: [DONE]\\n\\n`. JSON is compact and keeps non-ASCII text as UTF-8, as serde_json
writes it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

OPENAI_DONE = b"data: [DONE]\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


def dumps(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def tgi_event(payload: dict) -> bytes:
    return f"data:{dumps(payload)}\n\n".encode()


def openai_event(payload: dict) -> bytes:
    return f"data: {dumps(payload)}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """Streams `events`; if the client disconnects, the generator is closed at once.

    Closing it runs the generator's `finally`, which cancels the engine stream and frees its batch
    slot. Starlette's StreamingResponse only notices a disconnect on ASGI servers older than spec
    2.4, and otherwise leaves the generator to the garbage collector, so the watch is done here for
    every server.
    """

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(events, headers={**STREAM_HEADERS, **(headers or {})}, media_type="text/event-stream")
        self.events = events
        # also called when the generator never started (client gone before the first event),
        # in which case closing it runs none of its code
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                try:
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the client went away mid-send (ASGI spec 2.4 servers)
                    pass
                tg.cancel_scope.cancel()
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                self.on_close()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await `work` (a whole non-streamed generation), abandoning it if the client hangs up first.

    Returns (completed, result). The request body has been read by then, so the next ASGI message
    can only be the disconnect.
    """
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, request.receive, tg.cancel_scope)
        try:
            outcome.append(await work)
        except Exception as e:  # noqa: BLE001  re-raised below, unwrapped (a task group wraps it in an ExceptionGroup)
            failure.append(e)
        tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (True, outcome[0]) if outcome else (False, None)
