"""What the routes share: the model, its limits, the engine, and one running generation."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request

from quantpress import errors
from quantpress.prompts import ChatFormatter
from quantpress.runtime.engine import Engine, SamplingParams, Stream, TokenEvent
from quantpress.runtime.loader import LoadedModel
from quantpress.server.errors import ApiError, from_engine
from quantpress.server.metrics import Metrics, RequestTimer
from quantpress.server.settings import Limits

T = TypeVar("T")


@dataclass
class ServerState:
    loaded: LoadedModel
    limits: Limits
    engine: Engine
    formatter: ChatFormatter
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))  # OpenAI `created` of the model
    running: bool = False  # the engine is started and not closed
    validation_threads: anyio.CapacityLimiter = field(init=False)  # limits.validation_workers of them

    def __post_init__(self) -> None:
        self.validation_threads = anyio.CapacityLimiter(self.limits.validation_workers)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    async def off_loop(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run request work that can take long (tokenizing a prompt, rendering a chat template,
        decoding many tokens) on a validation worker thread, so the event loop keeps answering
        every other request (/health included) meanwhile. QuantpressErrors become HTTP errors."""
        try:
            return await anyio.to_thread.run_sync(partial(function, *args, **kwargs), limiter=self.validation_threads)
        except errors.QuantpressError as e:
            raise from_engine(e) from e

    def start(self, prompt_ids: list[int], params: SamplingParams, timer: RequestTimer) -> Generation:
        """Queue a generation; a full queue is 429, an over-long prompt 422."""
        try:
            stream = self.engine.submit(prompt_ids, params)
        except errors.QuantpressError as e:
            raise from_engine(e) from e
        return Generation(stream, timer)

    async def prompt_logprobs(self, prompt_ids: list[int]) -> list[float | None]:
        """Log-probability of each prompt token given the ones before (a forward pass: off the event loop)."""
        try:
            return await anyio.to_thread.run_sync(self.engine.prompt_logprobs, prompt_ids)
        except errors.QuantpressError as e:
            raise from_engine(e) from e


def server_state(request: Request) -> ServerState:
    """The state of the app serving this request."""
    return request.app.state.quantpress


State = Annotated[ServerState, Depends(server_state)]  # route parameter type: FastAPI injects the state


class Generation:
    """One engine stream as the routes consume it.

    Iterating yields token events and stamps the timer; an engine failure becomes a 424 ApiError, a
    stream that ends without its final event a 500. `close()` cancels the engine stream unless it
    finished, which frees its batch slot when a client goes away. A plain iterator class rather than
    an async generator, so that closing it never waits on the garbage collector.
    """

    def __init__(self, stream: Stream, timer: RequestTimer) -> None:
        self.stream = stream
        self.timer = timer
        self.done = False
        self._events = stream.__aiter__()

    @property
    def seed(self) -> int:
        return self.stream.seed

    @property
    def prompt_tokens(self) -> int:
        return self.stream.prompt_tokens

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            self.done = True
            raise ApiError(500, "incomplete_generation", "Incomplete generation") from None
        except errors.QuantpressError as e:
            self.done = True
            raise from_engine(e) from e
        self.timer.mark_token()
        if event.finish_reason is not None:
            self.done = True
            self.timer.mark_end()
        return event

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.stream.cancel()


async def collect(generation: Generation) -> list[TokenEvent]:
    """Every event of a generation; cancels it if abandoned part-way (client gone, error)."""
    try:
        return [event async for event in generation]
    finally:
        generation.close()
