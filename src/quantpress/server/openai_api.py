"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streams follow OpenAI and vLLM: a role chunk first (chat), content chunks, a finish chunk with an
empty delta, a usage chunk with `choices: []` when `stream_options.include_usage`, then
`data: [DONE]`. Matched stop strings are left out of the text, and finish reasons are only "stop"
and "length".

/v1/completions takes what lm-evaluation-harness `local-completions` sends for loglikelihood tasks:
token-id prompts, several prompts in one request, `echo` with `logprobs` and `max_tokens` 0 or 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

import quantpress
from quantpress.runtime.engine import SamplingParams, TokenEvent
from quantpress.runtime.sampling import with_stops
from quantpress.server.body import StrictJsonRoute
from quantpress.server.errors import (
    ApiError,
    finite_logprob,
    invalid,
    openai_body,
)
from quantpress.server.metrics import RequestTimer
from quantpress.server.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    check_chat,
    check_completion,
    message_dicts,
    sampling,
    stop_strings,
)
from quantpress.server.sse import (
    OPENAI_DONE,
    EventStreamResponse,
    openai_event,
    unless_disconnected,
)
from quantpress.server.state import Generation, ServerState, State, collect
from quantpress.server.text import StreamedText, token_texts
from quantpress.server.tgi import CLIENT_CLOSED
from quantpress.server.validation import (
    encode,
    resolve_max_new_tokens,
    sampling_params,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", route_class=StrictJsonRoute)
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], response_model=None)
    router.add_api_route("/completions", completions, methods=["POST"], response_model=None)
    router.add_api_route("/models", models, methods=["GET"])
    return router


@dataclass(frozen=True)
class Envelope:
    """The fields every response or chunk of one request repeats."""

    id: str
    object: str
    created: int
    model: str

    def wrap(self, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": f"quantpress-{quantpress.__version__}", "choices": choices, "usage": usage}


def envelope(prefix: str, obj: str, state: ServerState) -> Envelope:
    return Envelope(f"{prefix}-{uuid.uuid4().hex}", obj, int(time.time()), state.limits.model_id)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_event(err: ApiError) -> bytes:
    # `error_type` beside OpenAI's object lets huggingface_hub raise its matching exception class
    return openai_event({**openai_body(err), "error_type": err.error_type})


# -- chat ---------------------------------------------------------------------------------------


async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    state.metrics.request_started()
    timer = RequestTimer()
    check_chat(body, state.limits)
    # a TemplateError (roles out of order, a template that raises or runs out of budget) is a 422
    prompt_ids = await state.off_loop(state.formatter.encode, message_dicts(body.messages), add_generation_prompt=True)
    max_new_tokens = resolve_max_new_tokens(body.max_completion_tokens or body.max_tokens, len(prompt_ids),
                                            state.limits)
    # Stop strings of the prompt format (e.g. "USER:") come first, as in the terminal chat.
    requested = sampling_params(max_new_tokens=max_new_tokens, seed=body.seed,
                                stop=tuple(stop_strings(body, state.limits)), **sampling(body))
    params = with_stops(requested, state.formatter.stop)
    stops = params.stop
    state.metrics.request_validated(len(prompt_ids), max_new_tokens)
    timer.mark_validated()
    generation = state.start(prompt_ids, params, timer)
    env = envelope("chatcmpl", "chat.completion.chunk" if body.stream else "chat.completion", state)
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(chat_stream(env, generation, stops, top_n, include_usage, timer, state),
                                   generation.close)

    completed, events = await unless_disconnected(request, collect(generation))
    if not completed:
        return Response(status_code=CLIENT_CLOSED)
    text = StreamedText(stops)
    released = [r for event in events for r in text.push(event)[1]]
    message = {"role": "assistant", "content": text.content}
    logprobs = chat_logprobs(released, text.content, top_n)
    state.metrics.request_succeeded(timer, len(events))
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": text.finish_reason}
    return JSONResponse(env.wrap([choice], usage(len(prompt_ids), len(events))))


async def chat_stream(env: Envelope, generation: Generation, stops: tuple[str, ...], top_n: int | None,
                      include_usage: bool, timer: RequestTimer, state: ServerState) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return openai_event(env.wrap([choice]))

    text = StreamedText(stops)
    generated = 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in generation:
            generated += 1
            delta, released = text.push(event)
            if delta:
                yield chunk({"content": delta}, logprobs=chat_logprobs(released, text.content, top_n))
        yield chunk({}, finish_reason=text.finish_reason)
        if include_usage:
            yield openai_event(env.wrap([], usage(generation.prompt_tokens, generated)))
        state.metrics.request_succeeded(timer, generated)
        yield OPENAI_DONE
    except ApiError as e:
        state.metrics.request_failed("/v1/chat/completions", e.error_type, True)
        yield error_event(e)
        yield OPENAI_DONE
    finally:
        generation.close()


def chat_logprobs(released: list[tuple[int, TokenEvent]], content: str, top_n: int | None) -> dict | None:
    """OpenAI chat logprobs for the visible tokens; the engine reports only the chosen token's
    log-probability, so `top_logprobs` lists that token alone."""
    if top_n is None:
        return None
    entries = []
    for start, event in released:
        if event.special or start >= len(content):
            continue
        entry = {"token": event.text, "logprob": finite_logprob(event.logprob), "bytes": list(event.text.encode())}
        entry["top_logprobs"] = [dict(entry)] if top_n > 0 else []
        entries.append(entry)
    return {"content": entries}


# -- completions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    text: str  # what `echo` repeats
    ids: list[int]


def completion_prompts(body: CompletionRequest, state: ServerState) -> list[Prompt]:
    """A string, a list of strings, token ids, or a list of token-id lists (lm-eval's batches)."""
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise invalid("`prompt` cannot be empty")
    vocab = state.loaded.model.config.vocab_size
    prompts = []
    for item in raw:
        if isinstance(item, str):
            prompts.append(Prompt(item, encode(state.tokenizer, item, add_special_tokens=True)))
            continue
        bad = [i for i in item if not 0 <= i < vocab]
        if bad:
            raise invalid(f"token ids must be in [0, {vocab}). Given: {bad[:5]}")
        prompts.append(Prompt(state.tokenizer.decode(item, skip_special_tokens=False), list(item)))
    if any(not p.ids for p in prompts):
        raise invalid("`prompt` cannot be empty")
    return prompts


async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    state.metrics.request_started()
    timer = RequestTimer()
    check_completion(body, state.limits)
    prompts = await state.off_loop(completion_prompts, body, state)
    if body.stream and len(prompts) > 1:
        raise invalid("streaming takes one prompt per request")
    requested = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    stops = tuple(stop_strings(body, state.limits))
    knobs = sampling(body)
    # max_tokens 0 scores the prompt without generating (echo + logprobs); the prompt must still fit
    plans = [resolve_max_new_tokens(max(requested, 1), len(p.ids), state.limits) for p in prompts]
    plans = [n if requested > 0 else 0 for n in plans]
    for p, n in zip(prompts, plans):
        state.metrics.request_validated(len(p.ids), n)
    timer.mark_validated()
    params = [sampling_params(max_new_tokens=n, seed=body.seed, stop=stops, **knobs) if n else None for n in plans]
    generations = start_all(state, prompts, params, timer)
    env = envelope("cmpl", "text_completion", state)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = completion_stream(env, body, prompts[0], generations[0], stops, include_usage, timer, state)
        return EventStreamResponse(stream, generations[0].close if generations[0] is not None else None)

    async def work() -> list[tuple[dict, int]]:
        try:
            return [await completion_choice(i, body, p, g, stops, state) for i, (p, g) in
                    enumerate(zip(prompts, generations))]
        finally:
            for g in generations:
                if g is not None:
                    g.close()

    completed, results = await unless_disconnected(request, work())
    if not completed:
        return Response(status_code=CLIENT_CLOSED)
    choices = [choice for choice, _ in results]
    generated = sum(n for _, n in results)
    state.metrics.request_succeeded(timer, generated)
    return JSONResponse(env.wrap(choices, usage(sum(len(p.ids) for p in prompts), generated)))


def start_all(state: ServerState, prompts: list[Prompt], params: list[SamplingParams | None],
              timer: RequestTimer) -> list[Generation | None]:
    """Queue every prompt that generates (params None: max_tokens 0); if one is refused, withdraw
    the ones already queued."""
    generations: list[Generation | None] = []
    try:
        for prompt, p in zip(prompts, params):
            generations.append(state.start(prompt.ids, p, timer) if p is not None else None)
    except ApiError:
        for g in generations:
            if g is not None:
                g.close()
        raise
    return generations


async def completion_choice(index: int, body: CompletionRequest, prompt: Prompt, generation: Generation | None,
                            stops: tuple[str, ...], state: ServerState) -> tuple[dict, int]:
    """One prompt's choice, and how many tokens it generated."""
    events = await collect(generation) if generation is not None else []
    text = StreamedText(stops)
    for event in events:
        text.push(event)
    logprobs = None
    if body.logprobs is not None:
        logprobs = await completion_logprobs(body, prompt, events, state)
    choice = {"index": index, "text": (prompt.text if body.echo else "") + text.content, "logprobs": logprobs,
              "finish_reason": text.finish_reason or "length"}
    return choice, len(events)


async def completion_logprobs(body: CompletionRequest, prompt: Prompt, events: list[TokenEvent],
                              state: ServerState) -> dict:
    """Legacy OpenAI logprobs; with `echo` the prompt tokens come first, the first without a logprob.

    Every generated token is listed, EOS included, so lm-eval's `token_logprobs[ctxlen:-1]` lines
    up; each `top_logprobs` entry holds the chosen token only (the engine reports no alternatives).
    """
    tokens: list[str] = []
    values: list[float | None] = []
    if body.echo:
        tokens = await state.off_loop(token_texts, state.tokenizer, prompt.ids)
        values = list(await state.prompt_logprobs(prompt.ids))
    tokens += [e.text for e in events]
    values += [e.logprob for e in events]
    return legacy_logprobs(tokens, values, body.logprobs or 0, 0 if body.echo else len(prompt.text))


def legacy_logprobs(tokens: list[str], values: list[float | None], top_n: int, first_offset: int) -> dict:
    offsets, offset = [], first_offset
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    values = [finite_logprob(v) for v in values]
    top = [None if v is None else ({t: v} if top_n > 0 else {}) for t, v in zip(tokens, values)]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


async def completion_stream(env: Envelope, body: CompletionRequest, prompt: Prompt, generation: Generation | None,
                            stops: tuple[str, ...], include_usage: bool, timer: RequestTimer,
                            state: ServerState) -> AsyncIterator[bytes]:
    def chunk(text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> bytes:
        return openai_event(env.wrap([{"index": 0, "text": text, "logprobs": logprobs,
                                       "finish_reason": finish_reason}]))

    text = StreamedText(stops)
    generated = 0
    offset = len(prompt.text)
    want_logprobs = body.logprobs is not None
    try:
        if body.echo:
            echo_logprobs = await completion_logprobs(body, prompt, [], state) if want_logprobs else None
            yield chunk(prompt.text, logprobs=echo_logprobs)
        async for event in generation if generation is not None else no_events():
            generated += 1
            delta, released = text.push(event)
            if delta or (want_logprobs and released):
                logprobs = None
                if want_logprobs:
                    logprobs = legacy_logprobs([e.text for _, e in released], [e.logprob for _, e in released],
                                               body.logprobs or 0, offset)
                    offset += sum(len(e.text) for _, e in released)
                yield chunk(delta, logprobs=logprobs)
        yield chunk("", finish_reason=text.finish_reason or "length")
        if include_usage:
            yield openai_event(env.wrap([], usage(len(prompt.ids), generated)))
        state.metrics.request_succeeded(timer, generated)
        yield OPENAI_DONE
    except ApiError as e:
        state.metrics.request_failed("/v1/completions", e.error_type, True)
        yield error_event(e)
        yield OPENAI_DONE
    finally:
        if generation is not None:
            generation.close()


async def no_events() -> AsyncIterator[TokenEvent]:
    """max_tokens 0: nothing was queued."""
    for event in ():
        yield event


# -- models -------------------------------------------------------------------------------------


async def models(state: State) -> dict:
    return {"object": "list", "data": [{"id": state.limits.model_id, "object": "model", "created": state.created,
                                        "owned_by": "quantpress"}]}

