"""OpenAI request bodies, and how their sampling fields map onto SamplingParams.

Mapping choices (OpenAI's semantics where TGI's differ, noted):
- temperature 0 means greedy (SamplingParams' own convention), absent means sampling at 1.0
  (OpenAI and TGI agree);
- top_p may be 1.0 (off), which TGI's native validation would reject;
- presence_penalty and frequency_penalty are range-checked and ignored: the engine has neither,
  and TGI's mapping of presence_penalty onto repetition_penalty (+2) would turn OpenAI's default 0
  into a strong penalty;
- vLLM's extra `top_k` and `repetition_penalty` are honoured.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, FiniteFloat

from quantpress.server.errors import invalid
from quantpress.server.settings import Limits
from quantpress.server.validation import check_seed, stop_sequences


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class OpenAIParameters(BaseModel):
    """Fields both OpenAI routes share. Any `model` string is accepted: one model is served."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    top_k: int | None = None
    repetition_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    logit_bias: dict[str, float] | list[float] | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIParameters):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(OpenAIParameters):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


def sampling(req: OpenAIParameters) -> dict:
    """SamplingParams fields for the request's sampling settings."""
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0:
        raise invalid("`temperature` must be >= 0")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise invalid("`top_p` must be > 0.0 and <= 1.0")
    top_k = 0 if req.top_k in (None, -1) else req.top_k  # vLLM spells "off" as -1
    if top_k < 0:
        raise invalid("`top_k` must be strictly positive, or -1 for no limit")
    repetition_penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if repetition_penalty <= 0:
        raise invalid("`repetition_penalty` must be strictly positive")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise invalid(f"`{name}` must be >= -2.0 and <= 2.0")
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty}


def stop_strings(req: OpenAIParameters, limits: Limits) -> list[str]:
    return stop_sequences([req.stop] if isinstance(req.stop, str) else req.stop, limits)


def check_common(req: OpenAIParameters) -> None:
    if req.n not in (None, 1):
        raise invalid(f"`n` must be 1: one choice is generated per request. Given: {req.n}")
    if req.logit_bias:
        raise invalid("`logit_bias` is not supported")
    check_seed(req.seed)


def check_chat(req: ChatCompletionRequest, limits: Limits) -> None:
    check_common(req)
    if not req.messages:
        raise invalid("`messages` cannot be empty")
    if req.tools:
        raise invalid("`tools` are not supported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise invalid("`response_format` other than text is not supported")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= limits.max_top_n_tokens:
        raise invalid(f"`top_logprobs` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {req.top_logprobs}")


def check_completion(req: CompletionRequest, limits: Limits) -> None:
    check_common(req)
    if req.suffix:
        raise invalid("`suffix` is not supported")
    if req.best_of not in (None, 1):
        raise invalid("`best_of` != 1 is not allowed for this endpoint")
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_top_n_tokens:
        raise invalid(f"`logprobs` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {req.logprobs}")
    if req.max_tokens is not None and req.max_tokens < 0:
        raise invalid("`max_tokens` must be >= 0")


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat formatter takes them; text parts are joined as TGI joins them."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise invalid(f"content parts of type {part.get('type')!r} are not supported: text only")
                texts.append(part.get("text") or "")
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""})
    return out
