"""Token texts and stop strings, as the OpenAI routes present them.

TGI keeps a matched stop string in `generated_text`; OpenAI leaves it out. A stop string can span
several tokens, so a streamed reply holds back any tail that might still grow into one, and never
sends text it would have to take back.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantpress.runtime.detokenize import IncrementalDetokenizer, StopFilter
from quantpress.runtime.engine import TokenEvent


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads inside the decoded sequence (special tokens included): the
    engine's incremental detokenizer run over `ids`, so the texts add up to the decoded sequence.
    A token ending in half a UTF-8 character gets "" and the character goes to the token that
    completes it (or, at the end, to the last token)."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    texts = [detokenizer.push(i) for i in ids]
    if texts:
        texts[-1] += detokenizer.flush()
    return texts


def openai_finish_reason(engine_reason: str | None, stopped_by_string: bool) -> str:
    """OpenAI knows only "stop" and "length": EOS and stop strings are both "stop"."""
    return "stop" if stopped_by_string or engine_reason in ("eos_token", "stop_sequence") else "length"


class StreamedText:
    """Turns token events into OpenAI deltas that exclude stop strings (the one StopFilter decides
    what is safe to send).

    `push` returns the text that is safe to send now and the events whose text starts in it, with
    their offsets in the text (for streamed logprobs); the last event releases every event left,
    and sets `finish_reason`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.filter = StopFilter(stops)
        self.length = 0  # characters of every non-special token's text so far
        self.pending: list[tuple[int, TokenEvent]] = []  # (start offset in the text, event), not yet released
        self.finish_reason: str | None = None

    def push(self, event: TokenEvent) -> tuple[str, list[tuple[int, TokenEvent]]]:
        self.pending.append((self.length, event))
        delta = ""
        if not event.special:
            self.length += len(event.text)
            delta = self.filter.feed(event.text)
        if event.finish_reason is not None:
            delta += self.filter.finish()
            self.finish_reason = openai_finish_reason(event.finish_reason, self.filter.stopped)
            released, self.pending = self.pending, []
        else:
            sent = len(self.filter.text)
            released = [(start, e) for start, e in self.pending if start < sent]
            self.pending = [(start, e) for start, e in self.pending if start >= sent]
        return delta, released

    @property
    def content(self) -> str:
        return self.filter.text
