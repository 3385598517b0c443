"""A request's output as it crosses from the engine's scheduler thread to its consumer.

The scheduler only ever appends to a `Channel`; consumers read it blocking (`for event in
stream`, the terminal chat) or from an asyncio loop (`async for`, the ASGI server) without
blocking that loop: an async reader parks on an asyncio.Event of its own loop, which the
scheduler sets through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from quantpress.errors import GenerationFailed


@dataclass(frozen=True)
class TokenEvent:
    index: int  # 1-based position in the generated sequence
    id: int
    text: str  # this token's text; the texts of all non-special events add up to generated_text
    logprob: float  # log p(token) under the model's unmodified distribution (log_softmax of raw logits)
    special: bool  # a tokenizer special token or an EOS id; its text is not part of generated_text
    finish_reason: str | None  # on the last event only: "length" | "eos_token" | "stop_sequence"
    generated_text: str | None  # on the last event only: all generated text (stop string included)


@dataclass(frozen=True)
class _Failed:
    message: str


_CANCELLED = object()  # end of a cancelled stream: iteration stops without a final event
Item = TokenEvent | _Failed | object


class Channel:
    """Thread-safe FIFO with a blocking `get` and an awaitable `aget` (one consumer at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[Item] = deque()
        self._ready = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None  # the async reader's loop, bound by aget
        self._event: asyncio.Event | None = None

    def put(self, item: Item) -> None:
        with self._lock:
            self._items.append(item)
            self._ready.notify()
            loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def empty(self) -> bool:
        with self._lock:
            return not self._items

    def get(self) -> Item:
        with self._ready:
            self._ready.wait_for(lambda: self._items)
            return self._items.popleft()

    async def aget(self) -> Item:
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                loop = asyncio.get_running_loop()
                if self._loop is not loop:  # first async read (or a new loop): park on this loop
                    self._loop, self._event = loop, asyncio.Event()
                # cleared under the lock, before any later put schedules its set()
                self._event.clear()
                event = self._event
            await event.wait()


class Stream:
    """One request's output: iterate it (blocking or async) for TokenEvents."""

    def __init__(self, seed: int, prompt_tokens: int, on_cancel: Callable[[], None],
                 pump: Callable[[], None] | None = None) -> None:
        self.seed = seed  # the effective seed (drawn by the engine when the request had none)
        self.prompt_tokens = prompt_tokens
        self._channel = Channel()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel
        self._pump = pump  # an inline engine's scheduler iteration, run by the reader (Engine `inline`)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away). Safe from any thread, idempotent: the
        sequence leaves the batch at the engine's next step and iteration then ends."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            while self._pump is not None and self._channel.empty():
                self._pump()
            item = self._channel.get()
            if _is_end(item):
                return
            yield item
            if item.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return _AsyncEvents(self._channel)

    # -- the scheduler's side --------------------------------------------------------------
    def emit(self, event: TokenEvent) -> None:
        self._channel.put(event)

    def fail(self, message: str) -> None:
        self._channel.put(_Failed(message))

    def end_cancelled(self) -> None:
        self._channel.put(_CANCELLED)


class _AsyncEvents:
    """A plain async iterator (not an async generator, so abandoning it needs no cleanup)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._done = False

    def __aiter__(self) -> _AsyncEvents:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._channel.aget()
        self._done = not isinstance(item, TokenEvent) or item.finish_reason is not None
        if _is_end(item):
            raise StopAsyncIteration
        return item


def _is_end(item: Item) -> bool:
    """True for the end of a cancelled stream; raises for a failure; False for a TokenEvent."""
    if isinstance(item, _Failed):
        raise GenerationFailed(item.message)
    return item is _CANCELLED
