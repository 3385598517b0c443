"""Server settings (what the CLI passes) and the token limits they resolve to for one model."""

from __future__ import annotations

from dataclasses import dataclass

from quantpress.errors import ConfigError
from quantpress.runtime.loader import LoadedModel

FALLBACK_CONTEXT = 2048  # for configs that do not state max_position_embeddings
TGI_PAYLOAD_LIMIT = 2_000_000  # TGI's default --payload-limit, in bytes
# Request bytes one prompt token may take: a token is rarely more than 10 characters, and JSON
# escapes a character in at most 6 bytes (\uXXXX), so max_input_tokens of any text fit.
BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class ServerSettings:
    model_id: str | None = None  # shown in /info and as OpenAI `model`; None: the model folder's name
    max_input_tokens: int | None = None  # None: max_total_tokens - 1 (as TGI)
    max_total_tokens: int | None = None  # input + new tokens; None: the model's max_position_embeddings
    max_concurrent_requests: int = 128  # running + waiting; one more gets 429
    max_batch_size: int = 16  # sequences the engine decodes together
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    # Largest request body; more is refused with 413 while it is read, before it is parsed.
    # None: max_input_tokens * BYTES_PER_TOKEN, at least TGI's 2 MB.
    max_request_bytes: int | None = None
    # Threads that tokenize prompts and render chat templates (TGI's --validation-workers): work
    # kept off the event loop, and bounded so that big prompts cannot take all memory at once.
    validation_workers: int = 2
    template: str | None = None  # chat prompt format; None: what the model folder records
    # Fixed-shape GEMMs so a request's logits never depend on what else runs (bitwise: a seeded
    # request gives the same text alone and under load); costs ~2x single-stream speed on CPU.
    batch_invariant: bool = False


@dataclass(frozen=True)
class Limits:
    """The limits requests are validated against, with every default filled in."""

    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_batch_size: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_request_bytes: int
    validation_workers: int


def resolve_limits(loaded: LoadedModel, settings: ServerSettings) -> Limits:
    """Fill the defaults from the model and check the settings fit it (TGI refuses the same cases at launch)."""
    context = loaded.max_length or FALLBACK_CONTEXT
    total = settings.max_total_tokens or context
    if total > context:
        raise ConfigError(f"max_total_tokens {total} exceeds the model's context of {context} tokens "
                          "(max_position_embeddings); lower --max-total-tokens")
    max_input = settings.max_input_tokens if settings.max_input_tokens is not None else total - 1
    if not 0 < max_input < total:
        raise ConfigError(f"max_input_tokens ({max_input}) must be at least 1 and less than max_total_tokens ({total})")
    for name in ("max_concurrent_requests", "max_batch_size", "validation_workers"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.max_stop_sequences < 0 or settings.max_top_n_tokens < 0:
        raise ConfigError("max_stop_sequences and max_top_n_tokens must be >= 0")
    max_request_bytes = settings.max_request_bytes
    if max_request_bytes is None:
        max_request_bytes = max(TGI_PAYLOAD_LIMIT, max_input * BYTES_PER_TOKEN)
    elif max_request_bytes < 1:
        raise ConfigError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
    return Limits(
        model_id=settings.model_id or loaded.path.name,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_batch_size=settings.max_batch_size,
        max_stop_sequences=settings.max_stop_sequences,
        max_top_n_tokens=settings.max_top_n_tokens,
        max_request_bytes=max_request_bytes,
        validation_workers=settings.validation_workers,
    )
