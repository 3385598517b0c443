"""The closed-context ("contextual question answering") prompt that airoboros-style and EM German
models were trained on for retrieval-augmented generation.

Layout, as jondurbin describes it (huggingface.co/jondurbin/airoboros-l2-70b-2.1/discussions/4,
the airoboros model cards; EM German's README uses the same tags for its RAG variant):
BEGININPUT opens a source, BEGINCONTEXT..ENDCONTEXT holds its `key: value` metadata (url, date,
author: what the answer should cite), then the source's text, then ENDINPUT; as many sources as
fit; BEGININSTRUCTION..ENDINSTRUCTION holds the question. The result is the *user message*: wrap
it in the model's chat format like any other message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from quantpress.errors import ConfigError

DELIMITERS = ("BEGININPUT", "BEGINCONTEXT", "ENDCONTEXT", "ENDINPUT", "BEGININSTRUCTION", "ENDINSTRUCTION")


def rag_prompt(sources: Sequence[tuple[Mapping[str, str], str]], question: str) -> str:
    """One BEGININPUT block per (metadata, text) source, then the question; lines joined by "\\n",
    no newline after ENDINSTRUCTION. Text and question are stripped of surrounding whitespace."""
    if not sources:
        raise ConfigError("a closed-context prompt needs at least one source")
    lines: list[str] = []
    for i, (metadata, text) in enumerate(sources):
        lines += ["BEGININPUT", "BEGINCONTEXT"]
        for key, value in metadata.items():
            _check_field(key, value, i)
            lines.append(f"{key}: {value}")
        lines += ["ENDCONTEXT", _checked_block(text, f"source {i}'s text"), "ENDINPUT"]
    lines += ["BEGININSTRUCTION", _checked_block(question, "the question"), "ENDINSTRUCTION"]
    return "\n".join(lines)


def _check_field(key: object, value: object, index: int) -> None:
    if not isinstance(key, str) or not isinstance(value, str):
        raise ConfigError(f"source {index}: metadata keys and values must be strings, got {key!r}: {value!r}")
    if not key or ":" in key or "\n" in key or "\r" in key or "\n" in value or "\r" in value:
        raise ConfigError(f"source {index}: metadata {key!r}: {value!r} must be one line, with a non-empty key "
                          "that holds no ':'")


def _checked_block(text: str, label: str) -> str:
    """The text stripped; a line that is one of the delimiters would end the block early."""
    if not isinstance(text, str):
        raise ConfigError(f"{label} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ConfigError(f"{label} is empty")
    clash = next((line.strip() for line in text.splitlines() if line.strip() in DELIMITERS), None)
    if clash is not None:
        raise ConfigError(f"{label} contains a {clash} line, which would break the prompt's block structure")
    return text
