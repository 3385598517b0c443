"""Streaming text: incremental detokenization and stop strings, one token at a time.

The one detokenizer and the one stop-string filter of every generation path: the engine uses them
to emit token texts and to end a request at a stop string, the terminal chat and the OpenAI routes
to show a reply cut before its stop string, and the server to give prompt tokens their texts.
"""

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

    def __init__(self, tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens  # False: special tokens are text too (prompt token texts)
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # window start: the first id of the last emitted group (or of the context)
        self._read = len(self._ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" when held back). With skip_special_tokens
        a special token adds nothing: the engine gives those their own text."""
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
        return (decode(window[:emitted], skip_special_tokens=self._skip_special),
                decode(window, skip_special_tokens=self._skip_special))


class StopFilter:
    """The generated text cut before the first stop string, released as it becomes safe to show.

    Text that could still grow into a stop string is held back until the next text decides, so a
    stop string is never shown, not even in part. Matching is on decoded text, so a stop string may
    span tokens or end inside one (TGI only matches at the end of the text, which misses a stop
    string followed by more characters in the same token). Only the held-back tail is searched
    again: released text never ends in the beginning of a stop string, so none can start in it.

    `strip` also drops leading and trailing whitespace (trailing whitespace is held back until more
    text follows), as FastChat strips replies: the chat stores the reply in the conversation and
    formats such as Vicuna put their own space before it.
    """

    def __init__(self, stops: Sequence[str], *, strip: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)  # "" would stop at once; the server drops it too
        self.strip = strip
        self.text = ""  # everything released so far
        self.pending = ""  # held back: may be the beginning of a stop string (or trailing whitespace)
        self.stopped = False

    def feed(self, chunk: str) -> str:
        """The part of `chunk` (plus what was held back) that is now safe to show."""
        if self.stopped or not chunk:
            return ""
        buffer = self.pending + chunk
        cut = first_stop(buffer, self.stops)
        if cut is not None:
            shown, self.pending, self.stopped = buffer[:cut], "", True
        else:
            hold = len(buffer) - stop_prefix_length(buffer, self.stops)
            shown, self.pending = buffer[:hold], buffer[hold:]
        if self.strip:
            if not self.text:
                shown = shown.lstrip()
            kept = shown.rstrip()
            # the whitespace before a possible stop string may turn out to be the reply's end
            self.pending = ("" if self.stopped else shown[len(kept):]) + self.pending
            shown = kept
        self.text += shown
        return shown

    def finish(self) -> str:
        """Generation ended: a held-back partial stop string is ordinary text after all."""
        released = "" if self.stopped else self.pending
        if self.strip:
            released = released.rstrip() if self.text else released.strip()
        self.pending = ""
        self.text += released
        return released


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
