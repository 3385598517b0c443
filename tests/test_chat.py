"""The terminal chat loop on the bundled model (greedy, so every run is the same), and its pure
pieces: stop-string hold-back, incremental detokenization, fitting the conversation in context."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from quantpress.errors import PromptTooLong
from quantpress.prompts import chat_formatter, folder_formatter
from quantpress.runtime.chat import chat_loop, fit_conversation
from quantpress.runtime.detokenize import (
    IncrementalDetokenizer,
    StopFilter,
    first_stop,
    stop_prefix_length,
)
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)



class Session:
    """Scripted `read` and recorded `write`, with the written text split per turn."""

    def __init__(self, lines: list[str | None]) -> None:
        self.lines: Iterator[str | None] = iter(lines)
        self.turns: list[list[str]] = [[]]  # writes between two reads
        self.reads = 0

    def read(self) -> str | None:
        self.reads += 1
        self.turns.append([])
        return next(self.lines, None)

    def write(self, text: str) -> None:
        assert isinstance(text, str) and text
        self.turns[-1].append(text)


class RecordingFormatter:
    """A ChatFormatter that remembers every prompt it rendered for the model."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.stop = inner, inner.name, inner.stop
        self.prompts: list[str] = []

    def encode(self, messages, **options):
        self.prompts.append(self.inner.render(messages, **options))
        return self.inner.encode(messages, **options)


def test_conversation_grows_and_replies_stream(loaded):
    formatter = RecordingFormatter(chat_formatter(loaded, "vicuna"))
    session = Session(["The king said", "  And then?  "])
    messages = chat_loop(loaded, formatter, GREEDY, system="Be brief.", read=session.read, write=session.write)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[3]["content"] == "And then?"
    first, second = messages[2]["content"], messages[4]["content"]
    assert first and second and first == first.strip()
    # each turn's writes are the streamed reply, then the newline that ends it
    assert "".join(session.turns[1]) == first + "\n" and len(session.turns[1]) > 2
    assert "".join(session.turns[2]) == second + "\n"
    # the whole conversation is rendered each turn: the second prompt carries the first reply
    assert formatter.prompts[0] == "Be brief. USER: The king said ASSISTANT:"
    assert formatter.prompts[1] == f"Be brief. USER: The king said ASSISTANT: {first}</s>USER: And then? ASSISTANT:"


def test_reset_keeps_the_system_prompt_and_exit_ends(loaded):
    formatter = chat_formatter(loaded, "chatml")
    session = Session(["Hello", "/reset", "", "Goodbye", "/exit", "never read"])
    messages = chat_loop(loaded, formatter, GREEDY, system="S", read=session.read, write=session.write)
    assert [(m["role"], m["content"]) for m in messages[:2]] == [("system", "S"), ("user", "Goodbye")]
    assert len(messages) == 3 and messages[2]["role"] == "assistant"
    assert session.turns[2] == ["[conversation cleared]\n"]
    assert session.reads == 5  # "/exit" ends without reading further


def test_eof_at_once_returns_the_bare_conversation(loaded):
    session = Session([])
    assert chat_loop(loaded, chat_formatter(loaded, "none"), GREEDY, system=None, read=session.read,
                     write=session.write) == []
    assert chat_loop(loaded, chat_formatter(loaded, "none"), GREEDY, system="S", read=Session([]).read,
                     write=session.write) == [{"role": "system", "content": "S"}]


def test_stop_string_cuts_the_reply_and_is_never_shown(loaded):
    """Greedy decoding makes the reply known in advance: a stop string taken from its middle
    must end the reply right before it."""
    formatter = chat_formatter(loaded, "none")
    full = chat_loop(loaded, formatter, GREEDY, system=None, read=Session(["The king said"]).read,
                     write=lambda text: None)[-1]["content"]
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])
    stopping = dataclasses.replace(formatter, stop=("never produced", stop))
    session = Session(["The king said"])
    reply = chat_loop(loaded, stopping, GREEDY, system=None, read=session.read, write=session.write)[-1]["content"]
    assert reply == full[:full.index(stop)].rstrip()
    assert stop not in "".join(session.turns[1]) and "".join(session.turns[1]) == reply + "\n"


def test_old_exchanges_are_dropped_when_the_context_fills(loaded):
    class ShortContext(LoadedModel):
        max_length = 72  # shadows the property: 72 - 12 new tokens = 60 prompt tokens

    short = ShortContext(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(LoadedModel)})
    formatter = RecordingFormatter(chat_formatter(short, "vicuna"))
    session = Session(["The king said to the queen", "What did the queen answer him", "And what then"])
    messages = chat_loop(short, formatter, GREEDY, system="S", read=session.read, write=session.write)
    notices = [t for turn in session.turns for t in turn if t.startswith("[context full")]
    assert notices, session.turns
    assert messages[0] == {"role": "system", "content": "S"}
    assert messages[-2] == {"role": "user", "content": "And what then"}
    assert all(m["content"] != "The king said to the queen" for m in messages)
    assert len(formatter.inner.encode(messages[:-1])) <= 60  # the last prompt the model saw fit
    with pytest.raises(PromptTooLong, match="max-new-tokens"):
        chat_loop(short, formatter, GREEDY, system="S", read=Session(["word " * 80]).read, write=session.write)


def test_a_message_the_template_cannot_render_is_not_sent_and_the_chat_goes_on(loaded, tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ 1/0 }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    formatter = folder_formatter(tmp_path, loaded.tokenizer)
    session = Session(["boom", "The king said"])
    messages = chat_loop(loaded, formatter, GREEDY, system=None, read=session.read, write=session.write)
    assert session.turns[1] == ["[not sent: the chat template failed: ZeroDivisionError: division by zero]\n"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "The king said"
    assert "".join(session.turns[2]) == messages[1]["content"] + "\n"


# --- pure pieces ----------------------------------------------------------------------------------


class CharFormatter:
    """One token per character of content: budgets are easy to reason about."""

    name, stop = "chars", ()

    def encode(self, messages, **options):
        return [0] * sum(len(m["content"]) for m in messages)


def test_fit_conversation_drops_oldest_pairs_and_keeps_the_system_message():
    messages = [{"role": "system", "content": "ss"}] + [
        {"role": r, "content": c} for r, c in [("user", "u1"), ("assistant", "a1"), ("user", "u2"),
                                                ("assistant", "a2"), ("user", "u3")]]
    kept, ids, dropped = fit_conversation(CharFormatter(), messages, 8)
    assert [m["content"] for m in kept] == ["ss", "u2", "a2", "u3"] and len(ids) == 8 and dropped == 1
    kept, _, dropped = fit_conversation(CharFormatter(), messages, 4)
    assert [m["content"] for m in kept] == ["ss", "u3"] and dropped == 2
    assert fit_conversation(CharFormatter(), messages, None)[2] == 0
    with pytest.raises(PromptTooLong):
        fit_conversation(CharFormatter(), messages, 3)
    assert messages[1]["content"] == "u1"  # the caller's list is left alone


def feed_all(chunks: list[str], stops: tuple[str, ...]) -> tuple[list[str], StopFilter]:
    reply = StopFilter(stops, strip=True)
    released = [reply.feed(c) for c in chunks]
    released.append(reply.finish())
    return released, reply


def test_reply_filter_holds_back_a_possible_stop_string():
    released, reply = feed_all(["Hel", "lo U", "SE", "R: and more", " never"], ("USER:",))
    assert released == ["Hel", "lo", "", "", "", ""]
    assert reply.text == "Hello" and reply.stopped


def test_reply_filter_releases_a_false_alarm():
    released, reply = feed_all(["It is in the US", "A now", " US"], ("USER:",))
    assert released == ["It is in the", " USA now", "", " US"]  # at the end a held " US" is just text
    assert "".join(released) == reply.text == "It is in the USA now US" and not reply.stopped


def test_reply_filter_strips_surrounding_whitespace_and_cuts_at_the_earliest_stop():
    released, reply = feed_all(["  \n", " Hi", " there \n", "\n"], ())
    assert released == ["", "Hi", " there", "", ""] and reply.text == "Hi there"
    _, reply = feed_all(["a ### Human: b USER: c"], ("USER:", "### Human:"))
    assert reply.text == "a"
    _, reply = feed_all(["<|im_", "end|>"], ("<|im_end|>",))
    assert reply.text == "" and reply.stopped


def test_stop_helpers():
    assert stop_prefix_length("text US", ("USER:",)) == 2
    assert stop_prefix_length("text USER", ("USER:", "SER: x")) == 4
    assert stop_prefix_length("text", ("USER:",)) == 0
    assert stop_prefix_length("U", ("USER:",)) == 1
    assert first_stop("ab USER: ### Human:", ("### Human:", "USER:", "")) == 3
    assert first_stop("abc", ("x",)) is None


def test_incremental_decoding_reassembles_multibyte_text(loaded):
    tokenizer = loaded.tokenizer
    text = "Grüße, 日本語 ✓ — naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) / 4  # byte-level BPE splits these characters across tokens
    decoder = IncrementalDetokenizer(tokenizer, [])
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
