"""Token texts and stop strings, as the OpenAI routes present them.

TGI keeps a matched stop string in `generated_text`; OpenAI leaves it out. A stop string can span
several tokens, so a streamed reply holds back any tail that might still grow into one, and never
sends text it would have to take back.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantpress.runtime.detokenize import first_stop, stop_prefix_length
from quantpress.runtime.engine import TokenEvent

DECODE_WINDOW = 6  # tokens of left context kept when decoding one token's text
INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut in the middle


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads inside the decoded sequence (special tokens included).

    A token's text is decode(window + token) minus decode(window), the window starting at the
    previous emitted token (decoded alone, a SentencePiece token loses its leading space). While
    the text ends in half a UTF-8 character (a byte-level BPE token can be half of one) the token
    gets "" and the character goes to the token that completes it, so the texts add up to the
    decoded sequence, as TGI's and vLLM's incremental detokenizers do for generated tokens.
    """
    ids = list(ids)
    texts: list[str] = []
    prefix = read = 0  # ids[prefix:read] decode to text already given out; ids[read:] are pending
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix : i + 1], skip_special_tokens=False)
        last = i == len(ids) - 1
        if len(after) > len(before) and (last or not after.endswith(INCOMPLETE)):
            texts.append(after[len(before):])
            prefix, read = max(read, i + 1 - DECODE_WINDOW), i + 1
        else:
            texts.append("")
    return texts


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cut = first_stop(text, stops)
    return (text, False) if cut is None else (text[:cut], True)


def openai_finish_reason(engine_reason: str | None, stopped_by_string: bool) -> str:
    """OpenAI knows only "stop" and "length": EOS and stop strings are both "stop"."""
    return "stop" if stopped_by_string or engine_reason in ("eos_token", "stop_sequence") else "length"


class StreamedText:
    """Turns token events into OpenAI deltas that exclude stop strings.

    `push` returns the text that is safe to send now and the events whose text starts in it, with
    their offsets in the text (for streamed logprobs); the last event releases every event left,
    and sets `finish_reason`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # every non-special token's text so far
        self.sent = 0  # characters of `text` already sent
        self.pending: list[tuple[int, TokenEvent]] = []  # (start offset in text, event), not yet released
        self.finish_reason: str | None = None

    def push(self, event: TokenEvent) -> tuple[str, list[tuple[int, TokenEvent]]]:
        self.pending.append((len(self.text), event))
        if not event.special:
            self.text += event.text
        content, stopped = cut_at_stop(self.text, self.stops)
        if event.finish_reason is not None:
            self.finish_reason = openai_finish_reason(event.finish_reason, stopped)
            limit = len(content)
            released, self.pending = self.pending, []
        else:
            limit = len(content) if stopped else len(self.text) - stop_prefix_length(self.text, self.stops)
            released = [(start, e) for start, e in self.pending if start < limit]
            self.pending = [(start, e) for start, e in self.pending if start >= limit]
        delta = self.text[self.sent : max(limit, self.sent)]
        self.sent = max(limit, self.sent)
        return delta, released

    @property
    def content(self) -> str:
        return self.text[: self.sent]
