"""Prompt formats: byte-exact renders against the serving reference (section 2.1), the tokenizer's
Jinja chat_template, format resolution for a model folder, BOS handling, and the RAG prompt.

Expected strings are written out literally, copied from the reference table, never built by the
code under test.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from quantpress.api import bundled_model_dir
from quantpress.errors import ConfigError, TemplateError
from quantpress.prompts import (
    TEMPLATES,
    JinjaChatTemplate,
    folder_formatter,
    prompt_template,
    rag_prompt,
    render_chat,
)
from quantpress.prompts.sandbox import RenderLimits

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
LLAMA_SYS = "You are a helpful, respectful and honest assistant."
ALPACA_SYS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT_SYS = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.")

# HF's official Llama-2-chat chat_template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json)
LLAMA_2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# a ChatML template with no BOS, over several lines with indented tags as Hub templates are: the
# output is right only with transformers' trim_blocks and lstrip_blocks
CHATML_JINJA = """{% for message in messages %}
    {% if message['content'] is string %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' -}}
{% endif %}"""


def conv(*turns: str, system: str | None = None) -> list[dict]:
    """user, assistant, user, ... messages, with an optional system message first."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# (template, messages, expected): single turn with the default system, with a given one, and multi-turn
RENDERS = [
    ("vicuna", conv("Hi"), VICUNA_SYS + " USER: Hi ASSISTANT:"),
    ("vicuna", conv("Hi", system="Be brief."), "Be brief. USER: Hi ASSISTANT:"),
    ("vicuna", conv("u1", "a1", "u2", system="sys"), "sys USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"),
    ("em-german", conv("Hallo"), "Du bist ein hilfreicher Assistent. USER: Hallo ASSISTANT:"),
    ("em-german", conv("Hallo", system="Sei kurz."), "Sei kurz. USER: Hallo ASSISTANT:"),
    ("em-german", conv("u1", "a1", "u2"),
     "Du bist ein hilfreicher Assistent. USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"),
    ("llama-2-chat", conv("Hi"), "<s>[INST] <<SYS>>\n" + LLAMA_SYS + "\n<</SYS>>\n\nHi [/INST]"),
    ("llama-2-chat", conv("Hi", system="Be brief."), "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"),
    ("llama-2-chat", conv("u1", "a1", "u2", system="sys"),
     "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]"),
    ("mistral", conv("Hi"), "<s>[INST] Hi [/INST]"),
    ("mistral", conv("u1", "a1", "u2"), "<s>[INST] u1 [/INST]a1</s> [INST] u2 [/INST]"),
    ("guanaco", conv("Hi"), "### Human: Hi\n### Assistant:"),
    ("guanaco", conv("u1", "a1", "u2"), "### Human: u1\n### Assistant: a1</s>\n### Human: u2\n### Assistant:"),
    ("guanaco", conv("Hi", system="sys"), "sys\n\n### Human: Hi\n### Assistant:"),
    ("alpaca", conv("Hi"), ALPACA_SYS + "\n\n### Instruction:\nHi\n\n### Response:\n"),
    ("alpaca", conv("Hi", system="sys"), "sys\n\n### Instruction:\nHi\n\n### Response:\n"),
    ("alpaca", conv("u1", "a1", "u2"),
     ALPACA_SYS + "\n\n### Instruction:\nu1\n\n### Response:\na1\n\n### Instruction:\nu2\n\n### Response:\n"),
    ("alpaca-input", [{"role": "user", "content": "Sum them.", "input": "1, 2"}],
     ALPACA_INPUT_SYS + "\n\n### Instruction:\nSum them.\n\n### Input:\n1, 2\n\n### Response:\n"),
    ("alpaca-input", [{"role": "user", "content": "Sum them.", "input": "1, 2"}, {"role": "assistant", "content": "3"},
                      {"role": "user", "content": "Double it."}],
     ALPACA_INPUT_SYS + ("\n\n### Instruction:\nSum them.\n\n### Input:\n1, 2\n\n### Response:\n3\n\n"
                         "### Instruction:\nDouble it.\n\n### Response:\n")),
    ("chatml", conv("Hi"), ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")),
    ("chatml", conv("u1", "a1", "u2", system="sys"),
     ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
      "<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n")),
    ("none", conv("Hi there"), "Hi there"),
    ("none", conv("u1", "a1", "u2"), "u1\na1\nu2"),
]


@pytest.mark.parametrize(("name", "messages", "expected"), RENDERS, ids=[f"{r[0]}-{i}" for i, r in enumerate(RENDERS)])
def test_render_is_byte_exact(name, messages, expected):
    assert render_chat(prompt_template(name), messages) == expected


def test_every_template_is_covered():
    assert {r[0] for r in RENDERS} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_single_turn_chat_matches_the_card_text(name):
    """The card shows the single-turn text without a leading <s> (a tokenizer adds BOS to a plain
    prompt); the chat layout writes it where the format has one. Otherwise they agree."""
    template = TEMPLATES[name]
    chat = render_chat(template, [{"role": "user", "content": "PROMPT", "input": "INPUT"}
                                  if name == "alpaca-input" else {"role": "user", "content": "PROMPT"}])
    card = template.render("PROMPT", input="INPUT")
    assert chat == card or chat == "<s>" + card


def test_mistral_merges_the_system_prompt_into_the_first_user_message():
    text = render_chat(prompt_template("mistral"), conv("u1", "a1", "u2", system="Be brief."))
    assert text == "<s>[INST] Be brief.\n\nu1 [/INST]a1</s> [INST] u2 [/INST]"


def test_llama_2_strips_content_as_meta_does_and_vicuna_does_not():
    messages = conv("  u1 \n", " a1 ", "u2 ", system="sys")
    assert render_chat(prompt_template("llama-2-chat"), messages) == (
        "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\n  u1 [/INST] a1 </s><s>[INST] u2 [/INST]")
    assert render_chat(prompt_template("vicuna"), messages) == "sys USER:   u1 \n ASSISTANT:  a1 </s>USER: u2  ASSISTANT:"


def test_empty_system_prompt_leaves_the_system_block_out():
    assert render_chat(prompt_template("llama-2-chat"), conv("Hi", system="")) == "<s>[INST] Hi [/INST]"
    assert render_chat(prompt_template("chatml"), conv("Hi", system="")) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(prompt_template("vicuna"), conv("Hi", system="")) == "USER: Hi ASSISTANT:"


def test_default_system_override_applies_only_without_a_system_message():
    vicuna = prompt_template("vicuna")
    assert render_chat(vicuna, conv("Hi"), default_system="Recorded.") == "Recorded. USER: Hi ASSISTANT:"
    assert render_chat(vicuna, conv("Hi", system="Given."), default_system="Recorded.") == "Given. USER: Hi ASSISTANT:"


def test_without_generation_prompt_the_conversation_ends_after_the_last_message():
    assert render_chat(prompt_template("chatml"), conv("u1", "a1", system="s"), add_generation_prompt=False) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n")
    assert render_chat(prompt_template("llama-2-chat"), conv("u1", "a1", system="s"), add_generation_prompt=False) == (
        "<s>[INST] <<SYS>>\ns\n<</SYS>>\n\nu1 [/INST] a1 </s>")
    assert render_chat(prompt_template("vicuna"), conv("u1", system="s"), add_generation_prompt=False) == "s USER: u1 "


@pytest.mark.parametrize(("name", "expected"), [
    ("vicuna", "s USER: u1 ASSISTANT: Once upon"),
    ("llama-2-chat", "<s>[INST] <<SYS>>\ns\n<</SYS>>\n\nu1 [/INST] Once upon"),
    ("mistral", "<s>[INST] s\n\nu1 [/INST]Once upon"),
    ("chatml", "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\nOnce upon"),
    ("alpaca", "s\n\n### Instruction:\nu1\n\n### Response:\nOnce upon"),
    ("guanaco", "s\n\n### Human: u1\n### Assistant: Once upon"),
    ("none", "s\nu1\nOnce upon"),
])
def test_final_assistant_message_is_continued(name, expected):
    messages = conv("u1", "Once upon", system="s")
    assert render_chat(prompt_template(name), messages) == expected  # auto: generation prompt + final assistant
    assert render_chat(prompt_template(name), messages, add_generation_prompt=False, continue_final=True) == expected


def test_continue_final_errors():
    with pytest.raises(TemplateError, match="last message to be from the assistant"):
        render_chat(prompt_template("vicuna"), conv("u1"), continue_final=True)
    with pytest.raises(TemplateError, match="two assistant turns"):
        render_chat(prompt_template("vicuna"), conv("u1", "a1"), continue_final=False)


@pytest.mark.parametrize(("messages", "match"), [
    (conv("u1", "a1", "u2")[1:], "message 0 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is 'user'"),
    (conv("u1", "a1") + [{"role": "system", "content": "late"}], "message 2 is 'system'"),
    (conv("u1", system="s") + [{"role": "tool", "content": "x"}], "message 2 is 'tool'"),
    ([{"role": "system", "content": "only"}], "no user message"),
    ([], "no user message"),
    ([{"role": "user"}], "'role' and a 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text or a list of text parts"),
])
@pytest.mark.parametrize("name", ["vicuna", "llama-2-chat", "mistral", "chatml"])
def test_bad_conversations_raise_template_error(name, messages, match):
    with pytest.raises(TemplateError, match=match):
        render_chat(prompt_template(name), messages)


def test_alpaca_without_input_block_rejects_an_input():
    with pytest.raises(TemplateError, match="alpaca-input"):
        render_chat(prompt_template("alpaca"), [{"role": "user", "content": "x", "input": "y"}])


def test_text_parts_and_braces_in_content_are_taken_literally():
    messages = [{"role": "system", "content": "{content} {prompt}"},
                {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "{system}"}]}]
    assert render_chat(prompt_template("vicuna"), messages) == "{content} {prompt} USER: a {system} ASSISTANT:"
    assert prompt_template("vicuna").render("{system}", "{prompt}") == "{prompt} USER: {system} ASSISTANT:"


def test_card_render_keeps_the_input_placeholder():
    assert prompt_template("alpaca-input").render("{prompt}") == (
        ALPACA_INPUT_SYS + "\n\n### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n")


# --- the tokenizer's chat_template --------------------------------------------------------------


def test_jinja_llama_2_matches_the_registry_and_raises_on_alternation():
    jinja = JinjaChatTemplate(LLAMA_2_JINJA, bos_token="<s>", eos_token="</s>")
    messages = conv("u1 ", "a1", "u2", system="sys")
    assert jinja.render(messages) == "<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nu1 [/INST] a1 </s><s>[INST] u2 [/INST]"
    assert jinja.render(messages) == render_chat(prompt_template("llama-2-chat"), messages)
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        jinja.render(conv("u1", "a1")[1:])


def test_jinja_whitespace_control_and_continue_final():
    jinja = JinjaChatTemplate(CHATML_JINJA)
    assert jinja.render(conv("u1", system="s")) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n")
    assert jinja.render(conv("u1"), add_generation_prompt=False) == "<|im_start|>user\nu1<|im_end|>\n"
    assert jinja.render(conv("u1", "Once upon")) == (
        "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\nOnce upon")
    llama = JinjaChatTemplate(LLAMA_2_JINJA, bos_token="<s>", eos_token="</s>")
    assert llama.render(conv("u1", "Once upon")) == "<s>[INST] u1 [/INST] Once upon"


@pytest.mark.parametrize(("source", "match"), [
    ("{{ raise_exception('no system role') }}", "chat template: no system role"),
    ("{% for m in messages %}", "does not parse"),
    ("{{ messages.append(1) }}", "failed"),  # the sandbox is immutable
    ("{{ ''.__class__.__mro__ }}", "failed"),  # and blocks dunder access
])
def test_jinja_errors_are_template_errors(source, match):
    with pytest.raises(TemplateError, match=match):
        JinjaChatTemplate(source).render(conv("u1"))


# (source, what the TemplateError says): templates that would run for ever, fill memory, or raise
# what Jinja does not (issue 11, findings 4 and 7); each is refused within its render budget
HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "CPU time"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}", "CPU time"),
    ("{% for m in messages %}{% for c in range(10**5) %}{% for d in range(10**5) %}{% endfor %}{% endfor %}"
     "{% endfor %}", "CPU time"),
    ("{{ 10**(10**7) > 1 }}", "more than 65536 bits"),
    ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    ("{{ 'x' * 10**10 }}", "builds more than"),
    ("{{ ['x' * 1000000] * 1000 }}", "builds more than"),  # printing it would repeat the string
    ("{{ 'a'|center(9999999999) }}", "builds more than"),  # a literal width: not folded at compile time
    ("{{ 'a'.ljust(10**10) }}", "builds more than"),
    ("{{ '%999999999d' % 1 }}", "builds more than"),
    ("{{ ('%s' * 1000) % (('y' * 100000,) * 1000) }}", "builds more than"),
    ("{{ '{:>999999999}'.format(1) }}", "builds more than"),
    ("{{ range(1000)|map('string')|join('z' * 10000000) }}", "builds more than"),
    ("{{ ('a' * 1000).replace('', 'b' * 100000) }}", "builds more than"),
    ("{{ 'ab'|indent(10**9) }}", "builds more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "builds more than"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "builds more than"),
    ("{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='x') %}{% for i in range(64) %}"
     "{% set ns.s = twice(ns.s) %}{% endfor %}", "builds more than"),
    ("{{ 1/0 }}", "the chat template failed: ZeroDivisionError: division by zero"),
    ("{% macro deeper(n) %}{{ deeper(n + 1) }}{% endmacro %}{{ deeper(0) }}", "RecursionError"),
    ("{{ messages[0]['content'].index('no such text') }}", "ValueError: substring not found"),
    ("{{ 'abc'.encode('no-such-codec') }}", "LookupError"),
]


@pytest.mark.parametrize(("source", "match"), HOSTILE_TEMPLATES)
def test_hostile_templates_are_template_errors_within_their_budget(source, match):
    start = time.perf_counter()
    with pytest.raises(TemplateError, match=match):
        JinjaChatTemplate(source).render(conv("u1"))
    assert time.perf_counter() - start < 5  # the budget is 1 s of CPU time; compiling is instant


def test_what_real_templates_do_stays_within_the_budgets():
    source = ("{% for m in messages recursive %}{{ loop.index }}/{{ loop.length }} {{ m.content | trim | upper }}"
              "{% if m.children %}{{ loop(m.children) }}{% endif %}{% endfor %}|{{ '%d' | format(1700000000) }}|"
              "{{ '{:>6}'.format('r') }}|{{ 'a,b'.split(',') | join('+') }}|"
              "{{ messages | tojson(indent=2) | length }}")
    jinja = JinjaChatTemplate(source)
    assert jinja.render(conv("hi", "yo"), add_generation_prompt=False) == "1/2 HI2/2 YO|1700000000|     r|a+b|105"
    long = [{"role": "user", "content": "word " * 200_000}]  # 1 MB: a long prompt is no template abuse
    assert len(JinjaChatTemplate(LLAMA_2_JINJA).render(long)) > 1_000_000


def test_each_render_gets_a_fresh_budget():
    jinja = JinjaChatTemplate("{% for i in range(1000) %}{% for j in range(300) %}{% endfor %}{% endfor %}"
                              "{{ 'x' * 10000000 }}",
                              limits=RenderLimits(cpu_seconds=2.0, max_built=25_000_000))
    for _ in range(3):  # together they would exceed both budgets
        assert len(jinja.render(conv("u1"))) == 10_000_000


def test_jinja_helpers_are_available():
    jinja = JinjaChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}"
                              "{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}")
    assert jinja.render(conv("ü", "b"), add_generation_prompt=False) == (
        '[{"role": "user", "content": "ü"}, {"role": "assistant", "content": "b"}]|4|b')


# --- a model folder: resolution order and BOS ----------------------------------------------------


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def folder(tmp_path) -> Path:
    """The bundled model's tokenizer and config, without weights (the formatter needs none)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(bundled_model_dir() / name, tmp_path / name)
    return tmp_path


def tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def add_bos_post_processor(path: Path) -> None:
    """Make the tokenizer put <s> before every encoding, as Llama tokenizers do (add_bos_token)."""
    data = json.loads((path / "tokenizer.json").read_text())
    bos = [{"SpecialToken": {"id": "<s>", "type_id": 0}}]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(data))


def test_resolution_order(folder):
    assert folder_formatter(folder, None).name == "none"  # nothing recorded, no chat_template
    edit_json(folder / "config.json", quantization_config={"quant_method": "gptq", "meta": {"prompt_template": "alpaca"}})
    assert folder_formatter(folder, None).name == "alpaca"
    edit_json(folder / "quantize_config.json", bits=4, meta={"prompt_template": "vicuna"})
    formatter = folder_formatter(folder, None)
    assert (formatter.name, formatter.stop) == ("vicuna", ("</s>", "USER:"))
    edit_json(folder / "tokenizer_config.json", chat_template=CHATML_JINJA)
    assert folder_formatter(folder, None).name == "model"  # the model's own chat_template wins over a recorded one
    assert folder_formatter(folder, None, "chatml").name == "chatml"  # an explicit name wins over both
    forced = folder_formatter(folder, None, "model")
    assert forced.name == "model" and forced.stop == ()
    assert forced.render(conv("u1")) == "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n"


def test_template_file_and_named_template_lists(folder):
    edit_json(folder / "tokenizer_config.json",
              chat_template=[{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}])
    assert folder_formatter(folder, None).render(conv("u1")) == "DEFAULT"
    edit_json(folder / "tokenizer_config.json", chat_template=[{"name": "rag", "template": "FIRST"}])
    assert folder_formatter(folder, None).render(conv("u1")) == "FIRST"
    (folder / "chat_template.jinja").write_text("FROM FILE")
    assert folder_formatter(folder, None).render(conv("u1")) == "FROM FILE"


def test_unknown_or_missing_templates(folder):
    with pytest.raises(ConfigError, match="no chat_template"):
        folder_formatter(folder, None, "model")
    with pytest.raises(ConfigError, match="unknown prompt template 'vicunia'"):
        folder_formatter(folder, None, "vicunia")
    edit_json(folder / "quantize_config.json", meta={"prompt_template": "from-the-future"})
    with pytest.raises(ConfigError, match="from-the-future"):
        folder_formatter(folder, None)


def test_recorded_system_prompt_is_the_default(folder):
    edit_json(folder / "quantize_config.json", meta={"prompt_template": "vicuna", "system_prompt": "Recorded."})
    formatter = folder_formatter(folder, None)
    assert formatter.render(conv("Hi")) == "Recorded. USER: Hi ASSISTANT:"
    assert formatter.render(conv("Hi", system="Given.")) == "Given. USER: Hi ASSISTANT:"
    edit_json(folder / "tokenizer_config.json", chat_template=CHATML_JINJA)
    jinja = folder_formatter(folder, None, "model")
    assert jinja.render(conv("Hi")).startswith("<|im_start|>system\nRecorded.<|im_end|>\n<|im_start|>user\nHi")


def test_bos_and_eos_texts_accept_the_object_form(folder):
    edit_json(folder / "tokenizer_config.json", chat_template=LLAMA_2_JINJA,
              bos_token={"__type": "AddedToken", "content": "<s>", "special": True},
              eos_token={"__type": "AddedToken", "content": "</s>", "special": True})
    formatter = folder_formatter(folder, None)  # the texts come from the file, not from a tokenizer
    assert formatter.render(conv("u1", "a1", "u2")) == "<s>[INST] u1 [/INST] a1 </s><s>[INST] u2 [/INST]"


def test_bundled_tokenizer_adds_no_bos_so_only_templates_that_write_one_get_one(folder):
    tok = tokenizer(folder)
    assert tok("hello").input_ids == tok("hello", add_special_tokens=False).input_ids  # no BOS by default
    llama = folder_formatter(folder, tok, "llama-2-chat").encode(conv("Hi", "Hello", "Bye"))
    assert llama[0] == 1 and llama[1] != 1 and llama.count(1) == 2  # one <s> per [INST], none doubled
    assert llama == tok(render_chat(prompt_template("llama-2-chat"), conv("Hi", "Hello", "Bye")),
                        add_special_tokens=False).input_ids
    assert 1 not in folder_formatter(folder, tok, "vicuna").encode(conv("Hi"))


def test_tokenizer_that_adds_bos_gets_exactly_one(folder):
    add_bos_post_processor(folder)
    tok = tokenizer(folder)
    llama_text = render_chat(prompt_template("llama-2-chat"), conv("Hi"))
    assert tok(llama_text).input_ids[:2] == [1, 1]  # the double-BOS trap this guards against
    llama = folder_formatter(folder, tok, "llama-2-chat").encode(conv("Hi"))
    assert llama[0] == 1 and llama[1] != 1
    vicuna = folder_formatter(folder, tok, "vicuna").encode(conv("Hi"))
    assert vicuna[0] == 1 and vicuna[1] != 1  # the template writes none: the tokenizer's BOS is kept
    assert vicuna[1:] == tok(render_chat(prompt_template("vicuna"), conv("Hi")), add_special_tokens=False).input_ids


def test_jinja_path_matches_transformers_and_encodes_one_bos(folder):
    add_bos_post_processor(folder)
    edit_json(folder / "tokenizer_config.json", chat_template=LLAMA_2_JINJA)
    tok = tokenizer(folder)
    messages = conv("u1", "a1", "u2", system="sys")
    formatter = folder_formatter(folder, tok)
    assert formatter.render(messages) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = formatter.encode(messages)
    assert ids[0] == 1 and ids[1] != 1
    partial = conv("u1", "Once upon ")  # the marker trick keeps the trailing space, as transformers does
    assert formatter.render(partial) == tok.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    chatml = JinjaChatTemplate(CHATML_JINJA)
    for generation in (True, False):
        assert chatml.render(messages, add_generation_prompt=generation) == tok.apply_chat_template(
            messages, chat_template=CHATML_JINJA, tokenize=False, add_generation_prompt=generation)


def test_encode_without_tokenizer_is_a_clear_error(folder):
    with pytest.raises(Exception, match="no tokenizer"):
        folder_formatter(folder, None, "vicuna").encode(conv("Hi"))


# --- closed-context RAG prompt -------------------------------------------------------------------


def test_rag_prompt_is_exact():
    prompt = rag_prompt([({"date": "2021-01-01", "url": "https://web.site/123"}, "Blueberries are now green.\n"),
                         ({}, "Strawberries stay red.")], "  What color are blueberries? Source?\n")
    assert prompt == (
        "BEGININPUT\nBEGINCONTEXT\ndate: 2021-01-01\nurl: https://web.site/123\nENDCONTEXT\n"
        "Blueberries are now green.\nENDINPUT\n"
        "BEGININPUT\nBEGINCONTEXT\nENDCONTEXT\nStrawberries stay red.\nENDINPUT\n"
        "BEGININSTRUCTION\nWhat color are blueberries? Source?\nENDINSTRUCTION")


@pytest.mark.parametrize(("sources", "question", "match"), [
    ([], "q", "at least one source"),
    ([({"url": "a\nb"}, "t")], "q", "one line"),
    ([({"a:b": "c"}, "t")], "q", "holds no ':'"),
    ([({"": "c"}, "t")], "q", "non-empty key"),
    ([({"k": 3}, "t")], "q", "strings"),
    ([({}, "text\nENDINPUT\nmore")], "q", "ENDINPUT line"),
    ([({}, "text")], "q\n BEGININSTRUCTION ", "BEGININSTRUCTION line"),
    ([({}, "  ")], "q", "empty"),
])
def test_rag_prompt_validation(sources, question, match):
    with pytest.raises(ConfigError, match=match):
        rag_prompt(sources, question)
