"""Prompt formats of the model families that GPTQ cards describe, as data.

Each entry holds the exact single-turn prompt the card shows (`{system}` and `{prompt}`
placeholders), the default system prompt, the stop strings the format needs besides EOS, and a
`ChatFormat`: how a whole conversation is laid out. Strings are byte-exact copies of the serving
reference (section 2.1): a stray space after `ASSISTANT:` becomes its own token and degrades output.

The card's single-turn text leaves out a leading `<s>` (the tokenizer adds BOS to a plain prompt);
the chat layout writes `<s>` where the format puts it, because a chat prompt is tokenized with
`add_special_tokens=False` (see formatter.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quantpress.errors import ConfigError, TemplateError

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.")

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": str, "input"?: str}


@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is laid out. Each piece is text with `{content}` where the message goes."""

    user: str
    assistant: str  # a finished assistant turn; continuing one keeps only the text up to `{content}`
    generation: str  # opens the assistant turn the model writes (add_generation_prompt)
    system: str | None = None  # the system block; None: the format has no system role
    system_merge: str | None = None  # no system role: the first user message becomes this ({system}, {content})
    user_input: str | None = None  # a user message that carries an "input" ({content}, {input})
    start: str = ""  # written once, before everything (Mistral's <s>)
    separator: str = ""  # between messages
    strip: bool = False  # content.strip(), as Meta's Llama-2 reference code does


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # registry key, written to card front matter and quantize_config meta
    title: str  # as a card heading shows it
    single_turn: str  # "{system}" and "{prompt}" placeholders; ends with the generation prompt
    default_system: str | None  # None: the format has no default system prompt
    stop: tuple[str, ...] = ()  # stop strings besides EOS
    chat: ChatFormat = ChatFormat("{content}", "{content}", "", system="{content}", separator="\n")

    def render(self, prompt: str, system: str | None = None, *, input: str | None = None) -> str:
        """The single-turn prompt; `system` None means the template's default. `input` fills an
        `{input}` slot (alpaca-input); None leaves the placeholder, as a card shows it."""
        system = self.default_system if system is None else system
        values = {"system": system or "", "prompt": prompt}
        if input is not None:
            values["input"] = input
        return _fill(self.single_turn, values)


# Vicuna v1.1 (FastChat `vicuna_v1.1`: sep " ", sep2 "</s>"): `{sys} USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:`
_VICUNA = ChatFormat(system="{content} ", user="USER: {content} ", assistant="ASSISTANT: {content}</s>",
                     generation="ASSISTANT:")
# Meta's llama/generation.py: every pair is `<s>[INST] {u.strip()} [/INST] {a.strip()} </s>`, the system
# prompt wrapped in <<SYS>> and prepended to the first user message before the strip
_LLAMA_2 = ChatFormat(system_merge="<<SYS>>\n{system}\n<</SYS>>\n\n{content}", user="<s>[INST] {content} [/INST]",
                      assistant=" {content} </s>", generation="", strip=True)
# No system role: it is merged into the first user message (reference 2.3); `[/INST]a1</s> [INST] u2 [/INST]`
_MISTRAL = ChatFormat(start="<s>", system_merge="{system}\n\n{content}", user="[INST] {content} [/INST]",
                      assistant="{content}</s> ", generation="")
# text-generation-webui Guanaco-QLoRA: turns end `</s>\n`; a system prompt is a paragraph of its own
_GUANACO = ChatFormat(system="{content}\n\n", user="### Human: {content}\n", assistant="### Assistant: {content}</s>\n",
                      generation="### Assistant:")
# text-generation-webui Alpaca: no EOS text between turns, blank lines between blocks
_ALPACA = ChatFormat(system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                     assistant="### Response:\n{content}\n\n", generation="### Response:\n")
_ALPACA_INPUT = ChatFormat(system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                           user_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
                           assistant="### Response:\n{content}\n\n", generation="### Response:\n")
_CHATML = ChatFormat(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
                     assistant="<|im_start|>assistant\n{content}<|im_end|>\n", generation="<|im_start|>assistant\n")

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (
    PromptTemplate("vicuna", "Vicuna", "{system} USER: {prompt} ASSISTANT:", VICUNA_SYSTEM, ("</s>", "USER:"),
                   _VICUNA),
    # jphme/EM_German: "Vicuna-Format ohne Zeilenumbrüche"; multi-turn as Vicuna
    PromptTemplate("em-german", "EM German (Vicuna, no newlines)", "{system} USER: {prompt} ASSISTANT:",
                   "Du bist ein hilfreicher Assistent.", ("</s>",), _VICUNA),
    PromptTemplate("llama-2-chat", "Llama-2-Chat", "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST]",
                   "You are a helpful, respectful and honest assistant.", (), _LLAMA_2),
    PromptTemplate("mistral", "Mistral", "[INST] {prompt} [/INST]", None, (), _MISTRAL),
    PromptTemplate("guanaco", "Guanaco", "### Human: {prompt}\n### Assistant:", None, ("### Human:",), _GUANACO),
    PromptTemplate("alpaca", "Alpaca", "{system}\n\n### Instruction:\n{prompt}\n\n### Response:\n", ALPACA_SYSTEM,
                   ("### Instruction:",), _ALPACA),
    # Stanford Alpaca's `prompt_input`: the user message's "input" field fills the Input block
    PromptTemplate("alpaca-input", "Alpaca (with input)",
                   "{system}\n\n### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n",
                   ALPACA_INPUT_SYSTEM, ("### Instruction:",), _ALPACA_INPUT),
    PromptTemplate("chatml", "ChatML",
                   "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                   "You are a helpful assistant.", ("<|im_end|>",), _CHATML),
    # no format: the messages' text, one per line; a single user message is sent exactly as typed
    PromptTemplate("none", "None", "{prompt}", None),
)}


def prompt_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def render_chat(
    template: PromptTemplate,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    continue_final: bool | None = None,
    default_system: str | None = None,
) -> str:
    """A conversation as the prompt text of `template`.

    An optional system message comes first, then user and assistant messages alternate, starting
    with the user. Without a system message the system prompt is `default_system`, else the
    template's default; an empty one leaves the system block out. `add_generation_prompt` opens
    the assistant turn after a final user message. A final assistant message is continued (left
    open, no end-of-turn text) when `continue_final` is True, or when it is None and
    `add_generation_prompt` is set: the model then carries on writing that message.
    """
    fmt = template.chat
    system, turns = split_system(messages)
    if system is None:
        system = template.default_system if default_system is None else default_system
    continuing = continue_mode(turns, add_generation_prompt, continue_final)
    pieces = [_fill(fmt.system, {"content": system})] if system and fmt.system is not None else []
    for i, message in enumerate(turns):
        content = message_text(message)
        if message["role"] == "user":
            if i == 0 and system and fmt.system is None:
                assert fmt.system_merge is not None, f"{template.name}: a format needs a system block or merge"
                content = _fill(fmt.system_merge, {"system": system, "content": content})
            pieces.append(_user_turn(template, message, content.strip() if fmt.strip else content))
        else:
            content = content.strip() if fmt.strip else content
            last = i == len(turns) - 1
            slot = fmt.assistant.partition("{content}")[0] + "{content}" if last and continuing else fmt.assistant
            pieces.append(_fill(slot, {"content": content}))
    if add_generation_prompt and not continuing and fmt.generation:
        pieces.append(fmt.generation)
    return fmt.start + fmt.separator.join(pieces)


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """(system prompt or None, the user/assistant messages), checking roles alternate from the user."""
    check_messages(messages)
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = message_text(messages[0]), messages[1:]
    if not messages:
        raise TemplateError("the conversation has no user message")
    offset = 1 if system is not None else 0
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TemplateError(f"conversation roles must alternate user/assistant/user/assistant/... after an "
                                f"optional first system message; message {i + offset} is {message['role']!r}, "
                                f"expected {expected!r}")
    return system, list(messages)


def check_messages(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise TemplateError(f"message {i} must be a mapping with a 'role' and a 'content', got {message!r}")


def continue_mode(turns: Sequence[Message], add_generation_prompt: bool, continue_final: bool | None) -> bool:
    """Whether the final assistant message is left open for the model to continue."""
    last_is_assistant = bool(turns) and turns[-1]["role"] == "assistant"
    if continue_final is None:
        return last_is_assistant and add_generation_prompt
    if continue_final and not last_is_assistant:
        raise TemplateError("continue_final needs the last message to be from the assistant")
    if not continue_final and last_is_assistant and add_generation_prompt:
        raise TemplateError("a generation prompt after an assistant message would give two assistant turns in a "
                            "row; end with a user message, or continue the assistant's")
    return continue_final


def message_text(message: Message) -> str:
    """A message's content as text: a string, null (an assistant message that only called tools),
    or OpenAI-style content parts of type "text", joined."""
    content = message["content"]
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise TemplateError(f"a {message['role']} message's content must be text or a list of text parts, "
                        f"got {content!r}")


def _user_turn(template: PromptTemplate, message: Message, content: str) -> str:
    given = message.get("input")
    if given is None:
        return _fill(template.chat.user, {"content": content})
    if template.chat.user_input is None:
        hint = " (use alpaca-input)" if template.name == "alpaca" else ""
        raise TemplateError(f"the {template.name} format has no input block{hint}; remove the message's 'input'")
    return _fill(template.chat.user_input, {"content": content, "input": str(given)})


_PLACEHOLDER = re.compile(r"\{(system|prompt|content|input)\}")


def _fill(text: str, values: Mapping[str, str]) -> str:
    """Replace the placeholders in one pass: braces inside the values are never read as slots."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
