"""A model's own `chat_template` (Jinja), rendered the way transformers and TGI render it.

Chat templates come from downloaded repositories, so they are untrusted code: they run in
jinja2's ImmutableSandboxedEnvironment (as transformers does; jinja2 >= 3.1.6 closes the known
sandbox escapes) with a CPU-time and size budget per render (prompts.sandbox), with
transformers' whitespace settings (trim_blocks, lstrip_blocks) and the same helpers:
raise_exception, strftime_now, a tojson that does not HTML-escape, loopcontrols. Whatever a
template raises, at compile or render time (a Jinja error, 1/0, RecursionError, MemoryError, a
budget running out), reaches the caller as a TemplateError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import jinja2

from quantpress.errors import TemplateError
from quantpress.prompts.sandbox import BoundedSandbox, RenderLimits
from quantpress.prompts.templates import (
    Message,
    check_messages,
    continue_mode,
    message_text,
)

# transformers' marker for continue_final_message: appended to the last message, found after
# rendering, and everything from it on cut off, so the assistant turn stays open
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment(limits: RenderLimits) -> BoundedSandbox:
    env = BoundedSandbox(limits, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@contextmanager
def _template_errors(failure: str) -> Iterator[None]:
    """Every exception a template can cause, as a TemplateError "the chat template <failure>: ...".

    A template is code: besides Jinja's own errors it can divide by zero, recurse too deep, run
    out of memory or raise whatever a method it calls raises. The one place they are translated.
    """
    try:
        yield
    except TemplateError:
        raise  # raise_exception() and the render budgets say what happened already
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template {failure}: {e}") from None
    except Exception as e:  # noqa: BLE001  anything else the template's code raised
        raise TemplateError(f"the chat template {failure}: {type(e).__name__}: {e}") from None


class JinjaChatTemplate:
    """A compiled chat template with the tokenizer's BOS and EOS texts."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 limits: RenderLimits = RenderLimits()) -> None:
        self._environment = _environment(limits)
        with _template_errors("does not parse"):
            self._template = self._environment.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               continue_final: bool | None = None) -> str:
        """Render as transformers' apply_chat_template(tokenize=False) does; a final assistant
        message is continued under the same rule as templates.render_chat."""
        check_messages(messages)
        plain = [{**m, "content": message_text(m)} for m in messages]
        continuing = continue_mode([m for m in plain if m.get("role") != "system"], add_generation_prompt,
                                   continue_final)
        if not continuing:
            return self._render(plain, add_generation_prompt)
        final = plain[-1]["content"]
        text = self._render([*plain[:-1], {**plain[-1], "content": final + _CONTINUE_TAG}], False)
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0 or final.strip() not in text:
            raise TemplateError("the chat template drops the final assistant message, so it cannot be continued")
        # a template that strips content also strips the tag's space: then cut trailing space too
        return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        with _template_errors("failed"), self._environment.bounded():
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=None,
                                         documents=None)
