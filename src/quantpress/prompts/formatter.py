"""ChatFormatter: the prompt format of one model folder, chosen once, used for every conversation.

Which format (`chat_formatter(loaded, template)`):
1. `template` when given: a registry name (quantpress.prompts.TEMPLATES), or "model" for the
   tokenizer's own chat_template;
2. else the model's own chat_template, which wins when present (it is its authors' format, and
   what TGI, vLLM and transformers use): `chat_template.jinja`, else tokenizer_config.json
   "chat_template" (a string, or a list of {name, template}: "default", else the first);
3. else the name the release recorded, for the many models that ship without one:
   quantize_config.json `meta.prompt_template`, else config.json `quantization_config.meta`;
4. else "none" (the text as typed).
A recorded `meta.system_prompt` is the system prompt of every conversation that brings none.

BOS rule (`encode`): the rendered text is tokenized with add_special_tokens=False, so the
tokenizer never adds a second BOS to a template that writes `<s>` itself (the double-BOS bug of
reference 2.3). If the ids then do not start with the BOS id and the tokenizer puts BOS before a
plain prompt (probed once: encoding "a" with special tokens starts with bos_token_id, which is
how add_bos_token shows), the BOS id is prepended; a tokenizer that adds no BOS gets none added.
The prompt therefore starts with exactly one BOS whenever the template or the tokenizer wants one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantpress.errors import CheckpointError, ConfigError
from quantpress.formats.hf_folder import read_json
from quantpress.prompts.jinja import JinjaChatTemplate
from quantpress.prompts.templates import TEMPLATES, Message, render_chat

if TYPE_CHECKING:
    from quantpress.runtime.loader import LoadedModel

MODEL_TEMPLATE = "model"  # the name that selects the tokenizer's own chat_template

RenderFn = Callable[..., str]  # (messages, *, add_generation_prompt, continue_final) -> str


@dataclass(frozen=True)
class ChatFormatter:
    """Renders conversations in one prompt format and encodes them for generation."""

    name: str  # a TEMPLATES name, or "model" for the tokenizer's chat_template
    stop: tuple[str, ...]  # stop strings the format needs besides EOS
    render_fn: RenderFn = field(repr=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    add_bos: bool = False  # the tokenizer puts BOS before a plain prompt (see the module docstring)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               continue_final: bool | None = None) -> str:
        """The prompt text. A final assistant message is continued when `add_generation_prompt`
        is set (or `continue_final` is True): the model carries on writing it."""
        return self.render_fn(messages, add_generation_prompt=add_generation_prompt, continue_final=continue_final)

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               continue_final: bool | None = None) -> list[int]:
        """The prompt token ids, with exactly one BOS where one belongs (never a double BOS)."""
        if self.tokenizer is None:
            raise CheckpointError("this model folder has no tokenizer; chat prompts cannot be encoded")
        text = self.render(messages, add_generation_prompt=add_generation_prompt, continue_final=continue_final)
        return encode_prompt(self.tokenizer, text, add_bos=self.add_bos)


def chat_formatter(loaded: LoadedModel, template: str | None = None) -> ChatFormatter:
    """The formatter for a loaded model folder; `template` overrides what the folder says."""
    return folder_formatter(loaded.path, loaded.tokenizer, template, config=loaded.config)


def folder_formatter(path: str | Path, tokenizer: Any, template: str | None = None, *,
                     config: dict | None = None) -> ChatFormatter:
    """As chat_formatter, from a folder and its tokenizer (None: render only); `config` is
    config.json as already read, else it is read from the folder when present."""
    path = Path(path)
    if config is None:
        config = read_json(path / "config.json") if (path / "config.json").exists() else {}
    recorded_template, system = recorded_chat(path, config)
    source = model_chat_template(path) if template in (None, MODEL_TEMPLATE) else None
    if template is not None:
        name = template
    elif source is not None:
        name = MODEL_TEMPLATE
    else:
        name = recorded_template or "none"
    add_bos = tokenizer is not None and tokenizer_adds_bos(tokenizer)
    if name == MODEL_TEMPLATE:
        if source is None:
            raise ConfigError(f"{path} has no chat_template (tokenizer_config.json or chat_template.jinja); "
                              f"choose a format: {', '.join(sorted(TEMPLATES))}")
        bos, eos = special_token_texts(path, tokenizer)
        jinja = JinjaChatTemplate(source, bos_token=bos, eos_token=eos)
        return ChatFormatter(MODEL_TEMPLATE, (), _with_system(jinja.render, system), tokenizer, add_bos)
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(sorted(TEMPLATES))}, "
                          f"or {MODEL_TEMPLATE!r} for the tokenizer's chat_template")
    entry = TEMPLATES[name]
    return ChatFormatter(entry.name, entry.stop, partial(render_chat, entry, default_system=system), tokenizer,
                         add_bos)


def recorded_chat(path: Path, config: dict) -> tuple[str | None, str | None]:
    """(prompt_template, system_prompt) the release wrote under `meta`: quantize_config.json
    first, then config.json's quantization_config; None where neither says."""
    metas = []
    qc_path = path / "quantize_config.json"
    if qc_path.exists():
        metas.append(read_json(qc_path).get("meta") or {})
    metas.append((config.get("quantization_config") or {}).get("meta") or {})
    found: list[str | None] = []
    for key in ("prompt_template", "system_prompt"):
        value = next((m[key] for m in metas if m.get(key) is not None), None)
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{path}: meta.{key} must be a string, got {value!r}")
        found.append(value)
    return found[0], found[1]


def model_chat_template(path: Path) -> str | None:
    """The tokenizer's chat_template: chat_template.jinja (newer saves) wins over tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    tc_path = path / "tokenizer_config.json"
    value = read_json(tc_path).get("chat_template") if tc_path.exists() else None
    if value is None or isinstance(value, str):
        return value
    # a list of named templates (TGI's ChatTemplateVersions): "default", else the first
    if isinstance(value, list) and value and all(isinstance(t, dict) and "template" in t for t in value):
        return next((t["template"] for t in value if t.get("name") == "default"), value[0]["template"])
    raise CheckpointError(f"{tc_path}: chat_template must be a string or a list of {{name, template}}")


def special_token_texts(path: Path, tokenizer: Any) -> tuple[str, str]:
    """(bos_token, eos_token) as text for a chat template: tokenizer_config.json's strings or
    {"content": ...} objects, else the tokenizer's, else empty."""
    tc_path = path / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.exists() else {}
    texts = []
    for key in ("bos_token", "eos_token"):
        value = tc.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key, None)
        texts.append(value if isinstance(value, str) else "")
    return texts[0], texts[1]


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts a plain encoding with BOS (add_bos_token or its post-processor)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer.encode("a", add_special_tokens=True)
    return bool(probe) and probe[0] == bos


def encode_prompt(tokenizer: Any, text: str, *, add_bos: bool) -> list[int]:
    """`text` tokenized without special tokens, with BOS prepended when `add_bos` and the text does
    not already start with it."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and not (ids and ids[0] == bos):
        ids.insert(0, bos)
    return ids


def _with_system(render: RenderFn, system: str | None) -> RenderFn:
    """A recorded system prompt goes first in conversations that bring no system message."""
    if system is None:
        return render

    def render_with_system(messages: Sequence[Message], **options: Any) -> str:
        if not (messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        return render(messages, **options)

    return render_with_system
