"""Prompt templates of the model families that GPTQ cards describe, as data.

Each entry is the exact single-turn prompt its model was trained on, with `{system}` and
`{prompt}` placeholders, the default system prompt, and the strings that end a reply when the
model has no EOS habit of its own. Strings are byte-exact copies of the serving reference
(section 2.1): a stray space after `ASSISTANT:` becomes its own token and degrades output.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantpress.errors import ConfigError

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # registry key, written to card front matter and quantize_config meta
    title: str  # as a card heading shows it
    single_turn: str  # "{system}" and "{prompt}" placeholders; ends with the generation prompt
    default_system: str | None  # None: the format has no system prompt
    stop: tuple[str, ...] = ()  # stop strings besides EOS

    def render(self, prompt: str, system: str | None = None) -> str:
        """The single-turn prompt; `system` None means the template's default."""
        system = self.default_system if system is None else system
        return self.single_turn.replace("{system}", system or "").replace("{prompt}", prompt)


TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (
    PromptTemplate("vicuna", "Vicuna", "{system} USER: {prompt} ASSISTANT:", VICUNA_SYSTEM, ("</s>", "USER:")),
    PromptTemplate("em-german", "EM German (Vicuna, no newlines)", "{system} USER: {prompt} ASSISTANT:",
                   "Du bist ein hilfreicher Assistent.", ("</s>",)),
    PromptTemplate("llama-2-chat", "Llama-2-Chat", "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST]",
                   "You are a helpful, respectful and honest assistant."),
    PromptTemplate("mistral", "Mistral", "[INST] {prompt} [/INST]", None),
    PromptTemplate("guanaco", "Guanaco", "### Human: {prompt}\n### Assistant:", None, ("### Human:",)),
    PromptTemplate("alpaca", "Alpaca", "{system}\n\n### Instruction:\n{prompt}\n\n### Response:\n", ALPACA_SYSTEM,
                   ("### Instruction:",)),
    PromptTemplate("chatml", "ChatML",
                   "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                   "You are a helpful assistant.", ("<|im_end|>",)),
    PromptTemplate("none", "None", "{prompt}", None),
)}


def prompt_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
