"""The terminal chat: a conversation kept as messages, rendered whole each turn, replies streamed.

The CLI wraps chat_loop with input()/stdout; tests drive it with scripted callables. Each turn the
whole conversation is rendered in the model's format and prefilled from scratch: simple, and on
CPU a prefill of a few hundred tokens costs about as much as decoding a handful. Replies are
requests to an engine kept for the conversation, so a reply is what the server's
/v1/chat/completions gives for the same conversation, sampling parameters and seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from quantpress.errors import CheckpointError, PromptTooLong, TemplateError
from quantpress.runtime.detokenize import StopFilter
from quantpress.runtime.engine import Engine
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams, with_stops

EXIT, RESET = "/exit", "/reset"


class Formatter(Protocol):
    """What the chat needs of quantpress.prompts.ChatFormatter."""

    name: str
    stop: tuple[str, ...]

    def encode(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]: ...


def chat_loop(
    loaded: LoadedModel,
    formatter: Formatter,
    params: SamplingParams,
    *,
    system: str | None,
    read: Callable[[], str | None],
    write: Callable[[str], None],
) -> list[dict]:
    """Chat until `read` returns None (EOF) or "/exit"; "/reset" starts over with the same system
    prompt. Replies go to `write` as they are generated, each followed by "\\n"; notices are
    written as bracketed lines. Returns the conversation, system message first when given.

    When the conversation plus max_new_tokens outgrows the model's context, the oldest
    user/assistant exchanges are dropped (the system prompt stays) and a notice says so;
    PromptTooLong is raised when the system prompt and the newest message alone do not fit.
    A message the prompt format cannot render (TemplateError: the chat template raised, or ran
    out of its render budget) is left out of the conversation with a notice, and the chat goes on.
    """
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path} has no tokenizer files; cannot chat with it")
    params = with_stops(params, formatter.stop)  # as the server's chat route does
    with Engine(loaded, max_batch_size=1, max_concurrent_requests=1, inline=True) as engine:
        return _converse(engine, loaded, formatter, params, system, read, write)


def _converse(engine: Engine, loaded: LoadedModel, formatter: Formatter, params: SamplingParams,
              system: str | None, read: Callable[[], str | None], write: Callable[[str], None]) -> list[dict]:
    head = [{"role": "system", "content": system}] if system is not None else []
    messages = list(head)
    while (line := read()) is not None:
        text = line.strip()
        if text == EXIT:
            break
        if text == RESET:
            messages = list(head)
            write("[conversation cleared]\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            messages, prompt_ids, dropped = fit_conversation(formatter, messages, _budget(loaded, params))
        except TemplateError as e:
            messages.pop()
            write(f"[not sent: {e}]\n")
            continue
        if dropped:
            write(f"[context full: dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}]\n")
        reply = stream_reply(engine, prompt_ids, params, write)
        write("\n")
        messages.append({"role": "assistant", "content": reply.text})
    return messages


def _budget(loaded: LoadedModel, params: SamplingParams) -> int | None:
    """Prompt tokens allowed: the context minus the tokens the reply may take; None: no limit."""
    return None if loaded.max_length is None else loaded.max_length - params.max_new_tokens


def fit_conversation(formatter: Formatter, messages: Sequence[dict],
                     budget: int | None) -> tuple[list[dict], list[int], int]:
    """(messages kept, their prompt ids, exchanges dropped): the oldest user/assistant pairs go
    until the prompt fits `budget` tokens; a first system message always stays."""
    kept = list(messages)
    first = 1 if kept and kept[0]["role"] == "system" else 0
    ids = formatter.encode(kept)
    dropped = 0
    while budget is not None and len(ids) > budget:
        if len(kept) - first <= 1:
            raise PromptTooLong(f"the message ({len(ids)} prompt tokens with the system prompt and format) leaves "
                                f"no room in the model's context for the reply ({budget} prompt tokens fit with "
                                "max_new_tokens); shorten it or lower --max-new-tokens")
        del kept[first:first + 2]
        dropped += 1
        ids = formatter.encode(kept)
    return kept, ids, dropped


@dataclass(frozen=True)
class Reply:
    text: str  # exactly what was written: no surrounding whitespace, cut before the first stop string
    token_ids: list[int]  # every generated id (EOS or the tokens of a stop string included)
    finish_reason: str | None  # the engine's; None if the reply was interrupted


def stream_reply(engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 write: Callable[[str], None]) -> Reply:
    """Generate a reply on `engine`, writing its text as it is decoded (params.stop ends it)."""
    shown = StopFilter(params.stop, strip=True)
    stream = engine.submit(prompt_ids, params)
    token_ids: list[int] = []
    finish = None
    try:
        for event in stream:
            token_ids.append(event.id)
            finish = event.finish_reason
            if not event.special:
                _write_some(write, shown.feed(event.text))
    finally:
        if finish is None:  # interrupted (Ctrl-C, a failed write): free the engine's slot
            stream.cancel()
    _write_some(write, shown.finish())
    return Reply(shown.text, token_ids, finish)


def _write_some(write: Callable[[str], None], text: str) -> None:
    if text:
        write(text)
