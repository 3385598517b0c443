"""TGI's native routes: `POST /`, /generate, /generate_stream, /info, /health, /metrics, /tokenize.

Response shapes follow TGI's router (server.rs): `details` only when asked for, `seed` only when
sampling, `finish_reason` one of length | eos_token | stop_sequence, stop strings kept in the text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

import quantpress
from quantpress.runtime.engine import TokenEvent
from quantpress.server.body import StrictJsonRoute
from quantpress.server.errors import ApiError, finite_logprob, tgi_body
from quantpress.server.metrics import CONTENT_TYPE, RequestTimer
from quantpress.server.settings import Limits
from quantpress.server.sse import EventStreamResponse, tgi_event, unless_disconnected
from quantpress.server.state import Generation, ServerState, State, collect
from quantpress.server.text import token_texts
from quantpress.server.validation import (
    CompatGenerateRequest,
    GenerateRequest,
    ValidRequest,
    check_input_length,
    encode,
    validate_generate,
)

CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it, the log does


def build_router() -> APIRouter:
    router = APIRouter(route_class=StrictJsonRoute)
    router.add_api_route("/", compat_generate, methods=["POST"], response_model=None)
    router.add_api_route("/generate", generate, methods=["POST"], response_model=None)
    router.add_api_route("/generate_stream", generate_stream, methods=["POST"], response_model=None)
    router.add_api_route("/info", info, methods=["GET"])
    for path in ("/health", "/ping", "/"):
        router.add_api_route(path, health, methods=["GET"], response_model=None)
    router.add_api_route("/metrics", metrics, methods=["GET"], response_model=None)
    router.add_api_route("/tokenize", tokenize, methods=["POST"], response_model=None)
    return router


async def compat_generate(body: CompatGenerateRequest, request: Request,
                          state: State) -> Response:
    """huggingface_hub's and text-generation's URL: a one-element list, or SSE when `stream`.

    TGI defaults `return_full_text` here from the Hub pipeline tag; a local folder has none, so it
    stays false, as TGI does for a local model.
    """
    if body.stream:
        return await start_stream(body, state)
    return await run_generate(body, request, state, as_list=True)


async def generate(body: GenerateRequest, request: Request, state: State) -> Response:
    return await run_generate(body, request, state, as_list=False)


async def generate_stream(body: GenerateRequest, state: State) -> Response:
    return await start_stream(body, state)


async def admit(body: GenerateRequest, state: ServerState, *,
                stream: bool) -> tuple[ValidRequest, Generation, RequestTimer]:
    """Validate (tokenizing off the event loop), then queue; errors here are HTTP errors, before
    any byte of a stream is sent."""
    state.metrics.request_started()
    timer = RequestTimer()
    valid = await state.off_loop(validate_generate, body, state.tokenizer, state.limits, stream=stream)
    state.metrics.request_validated(valid.input_length, valid.params.max_new_tokens)
    timer.mark_validated()
    return valid, state.start(valid.prompt_ids, valid.params, timer), timer


async def run_generate(body: GenerateRequest, request: Request, state: ServerState, *, as_list: bool) -> Response:
    valid, generation, timer = await admit(body, state, stream=False)

    want_prefill = valid.details and valid.decoder_input_details

    async def work() -> tuple[list[dict], list[TokenEvent]]:
        try:
            prefill = await prefill_tokens(state, valid.prompt_ids) if want_prefill else []
            return prefill, await collect(generation)
        finally:
            generation.close()

    completed, result = await unless_disconnected(request, work())
    if not completed:
        return Response(status_code=CLIENT_CLOSED)
    prefill, events = result
    final = events[-1]
    output = {"generated_text": full_text(body.inputs, final, valid)}
    if valid.details:
        output["details"] = {
            "finish_reason": final.finish_reason,
            "generated_tokens": len(events),
            "seed": generation.seed if valid.sampling else None,
            "prefill": prefill,
            "tokens": [token_json(e) for e in events],
        }
    state.metrics.request_succeeded(timer, len(events))
    headers = timing_headers(state, timer, valid.input_length, len(events), len(body.inputs))
    return JSONResponse([output] if as_list else output, headers=headers)


async def start_stream(body: GenerateRequest, state: ServerState) -> Response:
    valid, generation, timer = await admit(body, state, stream=True)
    return EventStreamResponse(stream_events(body.inputs, valid, generation, timer, state), generation.close)


async def stream_events(inputs: str, valid: ValidRequest, generation: Generation, timer: RequestTimer,
                        state: ServerState) -> AsyncIterator[bytes]:
    """One `data:` event per token; the last carries generated_text (and details when asked)."""
    try:
        async for event in generation:
            payload = {"index": event.index, "token": token_json(event), "generated_text": None, "details": None}
            if event.finish_reason is not None:
                payload["generated_text"] = full_text(inputs, event, valid)
                if valid.details:
                    payload["details"] = {"finish_reason": event.finish_reason, "generated_tokens": event.index,
                                          "seed": generation.seed if valid.sampling else None,
                                          "input_length": valid.input_length}
                state.metrics.request_succeeded(timer, event.index)
            yield tgi_event(payload)
    except ApiError as e:
        # Headers are gone already: the error travels as an event, as TGI sends it.
        if e.error_type == "incomplete_generation":
            e = ApiError(500, "incomplete_generation_stream", "Incomplete generation stream")
        state.metrics.request_failed("/generate_stream", e.error_type, True)
        yield tgi_event(tgi_body(e))
    finally:
        generation.close()


def full_text(inputs: str, final: TokenEvent, valid: ValidRequest) -> str:
    text = final.generated_text or ""
    return inputs + text if valid.return_full_text else text


def token_json(event: TokenEvent) -> dict:
    return {"id": event.id, "text": event.text, "logprob": finite_logprob(event.logprob), "special": event.special}


async def prefill_tokens(state: ServerState, prompt_ids: list[int]) -> list[dict]:
    """`decoder_input_details`: each prompt token with its log-probability (the first has none)."""
    logprobs = await state.prompt_logprobs(prompt_ids)
    texts = await state.off_loop(token_texts, state.tokenizer, prompt_ids)
    return [{"id": i, "text": t, "logprob": finite_logprob(lp)} for i, t, lp in zip(prompt_ids, texts, logprobs)]


def timing_headers(state: ServerState, timer: RequestTimer, prompt_tokens: int, generated: int,
                   characters: int) -> dict[str, str]:
    """TGI's x-* response headers (times in ms, x-compute-time in s)."""

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": device_type(state),
        "x-compute-time": f"{timer.total_s:.6f}",
        "x-compute-characters": str(characters),
        "x-total-time": ms(timer.total_s),
        "x-validation-time": ms(timer.validation_s),
        "x-queue-time": ms(timer.queue_s),
        "x-inference-time": ms(timer.inference_s),
        "x-time-per-token": ms(timer.inference_s / max(generated, 1)),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated),
    }


def device_type(state: ServerState) -> str:
    return next(state.loaded.model.parameters()).device.type


def model_dtype(state: ServerState) -> str:
    dtypes = {p.dtype for p in state.loaded.model.parameters() if p.is_floating_point()}
    return str(min(dtypes, key=lambda d: torch.finfo(d).bits)) if dtypes else "unknown"


async def info(state: State) -> dict:
    """TGI's Info fields; `model_pipeline_tag` is null as for any model TGI serves from a folder."""
    limits = state.limits
    return {
        "model_id": limits.model_id,
        "model_sha": None,
        "model_dtype": model_dtype(state),
        "model_device_type": device_type(state),
        "model_pipeline_tag": None,
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "max_batch_size": limits.max_batch_size,
        "validation_workers": limits.validation_workers,
        "max_client_batch_size": 1,
        "router": "quantpress",
        "version": quantpress.__version__,
        "sha": None,
        "docker_label": None,
    }


async def health(state: State) -> Response:
    if state.running:
        return Response(status_code=200)
    return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)


async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def tokenize(body: GenerateRequest, state: State) -> Response:
    """Each token with its character span in `inputs`; special tokens the tokenizer adds span nothing."""
    if not getattr(state.tokenizer, "is_fast", False):
        raise ApiError(404, "no fast tokenizer", "No fast tokenizer available")
    return JSONResponse(await state.off_loop(token_spans, state.tokenizer, body, state.limits))


def token_spans(tokenizer, body: GenerateRequest, limits: Limits) -> list[dict]:
    """At most max_input_tokens, like any prompt: a 2 MB input would otherwise answer with 30 MB.
    The length is checked before any span is made (half a million offset pairs are not)."""
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    check_input_length(len(encode(tokenizer, body.inputs, add_special)), limits)
    encoding = tokenizer(body.inputs, add_special_tokens=add_special, return_offsets_mapping=True)
    tokens = []
    for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        text = body.inputs[start:stop] if stop > start else tokenizer.convert_ids_to_tokens(token_id)
        tokens.append({"id": token_id, "text": text, "start": start, "stop": stop})
    return tokens
