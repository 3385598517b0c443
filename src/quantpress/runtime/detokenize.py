"""Streaming text: incremental detokenization and stop-string matching, one token at a time."""

from __future__ import annotations

from collections.abc import Sequence

# Prompt tokens decoded in front of the first generated one, so a SentencePiece "▁word" keeps its
# leading space (decoded alone it would lose it); TGI starts its prefix window 5 tokens back too.
PROMPT_CONTEXT = 5
INCOMPLETE = "\ufffd"  # what a decoder shows for a UTF-8 sequence cut in the middle


class IncrementalDetokenizer:
    """The text each new token adds, as TGI and vLLM compute it.

    A token's text is decode(window + token) minus decode(window), where the window starts at the
    previous emitted token(s): decoding only a window keeps this O(1) per token, and decoding with
    context is what makes BPE merges and SentencePiece spaces come out right. While the decoded
    text ends in an incomplete UTF-8 sequence (a byte-level BPE token can be half a character)
    nothing is emitted; the bytes are held back until a later token completes the character.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # window start: the first id of the last emitted group (or of the context)
        self._read = len(self._ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add a generated (non-special) token; return the text it completes ("" when held back)."""
        self._ids.append(token_id)
        before, after = self._window_texts()
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The held-back text (an incomplete character shows as U+FFFD), once generation ends."""
        before, after = self._window_texts()
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix:]
        emitted = self._read - self._prefix
        decode = self._tokenizer.decode
        return (decode(window[:emitted], skip_special_tokens=True),
                decode(window, skip_special_tokens=True))


class StopMatcher:
    """Reports when the generated text first contains one of the stop strings.

    Matching is on decoded text, so a stop string may span tokens or end inside one (TGI only
    matches at the end of the text, which misses a stop string followed by more characters in the
    same token). Only the last len(longest) - 1 characters are kept between calls.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._keep = max((len(s) for s in stops), default=1) - 1
        self._tail = ""

    def feed(self, text: str) -> bool:
        if not self._stops or not text:
            return False
        window = self._tail + text
        self._tail = window[-self._keep:] if self._keep else ""
        return any(stop in window for stop in self._stops)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None (empty stop strings never match)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper beginning of some stop string: what a
    stream that never shows a stop string must hold back until the next text decides."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
