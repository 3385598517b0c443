"""Prompt formats: the registry of model-family templates (single-turn for cards, multi-turn for
chat and serve), the tokenizer's own Jinja chat_template, the per-model ChatFormatter, and the
closed-context RAG prompt."""

from quantpress.prompts.formatter import (
    MODEL_TEMPLATE,
    ChatFormatter,
    chat_formatter,
    folder_formatter,
)
from quantpress.prompts.jinja import JinjaChatTemplate
from quantpress.prompts.rag import rag_prompt
from quantpress.prompts.templates import (
    ALPACA_INPUT_SYSTEM,
    ALPACA_SYSTEM,
    TEMPLATES,
    VICUNA_SYSTEM,
    ChatFormat,
    Message,
    PromptTemplate,
    prompt_template,
    render_chat,
)

__all__ = ["ALPACA_INPUT_SYSTEM", "ALPACA_SYSTEM", "MODEL_TEMPLATE", "TEMPLATES", "VICUNA_SYSTEM", "ChatFormat",
           "ChatFormatter", "JinjaChatTemplate", "Message", "PromptTemplate", "chat_formatter", "folder_formatter",
           "prompt_template", "rag_prompt", "render_chat"]
