"""The terminal chat: a conversation kept as messages, rendered whole each turn, replies streamed.

The CLI wraps chat_loop with input()/stdout; tests drive it with scripted callables. Each turn the
whole conversation is rendered in the model's format and prefilled from scratch: simple, and on
CPU a prefill of a few hundred tokens costs about as much as decoding a handful.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

import torch

from quantpress.errors import CheckpointError, PromptTooLong, TemplateError
from quantpress.runtime.detokenize import (
    IncrementalDetokenizer,
    first_stop,
    stop_prefix_length,
)
from quantpress.runtime.generate import eos_ids, generate_ids
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams

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
        reply = stream_reply(loaded, prompt_ids, params, formatter.stop, write)
        write("\n")
        messages.append({"role": "assistant", "content": reply})
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


def stream_reply(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams, stops: tuple[str, ...],
                 write: Callable[[str], None]) -> str:
    """Generate a reply, writing text as it is decoded; returns exactly what was written: the reply
    without surrounding whitespace, cut before the first stop string."""
    decoder = IncrementalDetokenizer(loaded.tokenizer, prompt_ids)
    reply = ReplyFilter(stops)
    eos = eos_ids(loaded)
    # closing(): a stop string ends generation early; release the generator's KV cache right away
    with closing(generate_ids(loaded, torch.tensor(prompt_ids), params)) as tokens:
        for token in tokens:
            if token in eos:
                break
            released = reply.feed(decoder.push(token))
            if released:
                write(released)
            if reply.stopped:
                break
    released = reply.feed(decoder.flush()) + reply.finish()  # bytes held back for an unfinished character
    if released:
        write(released)
    return reply.text


@dataclass
class ReplyFilter:
    """Streams a reply while cutting it at the first stop string.

    Text that could be the start of a stop string is held back until the next text decides, so a
    stop string is never shown even in part. Leading and trailing whitespace is dropped (held back
    until more text follows), as FastChat strips replies: the reply is stored in the conversation
    and formats such as Vicuna put their own space before it.
    """

    stops: tuple[str, ...]
    text: str = ""  # everything released so far
    pending: str = ""
    stopped: bool = False

    def feed(self, chunk: str) -> str:
        """The part of `chunk` (plus what was held back) that is now safe to show."""
        if self.stopped:
            return ""
        buffer = self.pending + chunk
        if not self.text:
            buffer = buffer.lstrip()
        cut = first_stop(buffer, self.stops)
        if cut is not None:
            released, self.pending, self.stopped = buffer[:cut].rstrip(), "", True
        else:
            # hold a possible stop start, and the whitespace before it: it may turn out to be the end
            keep_from = len(buffer[:len(buffer) - stop_prefix_length(buffer, self.stops)].rstrip())
            released, self.pending = buffer[:keep_from], buffer[keep_from:]
        self.text += released
        return released

    def finish(self) -> str:
        """Generation ended: a held-back partial stop string is ordinary text after all."""
        released = "" if self.stopped else self.pending.rstrip()
        self.pending = ""
        self.text += released
        return released
