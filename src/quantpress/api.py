"""The typed Python API: quantize, load, evaluate, generate. The CLI is a thin layer over these."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantpress.calibration import tokenize
from quantpress.datasets import check_dataset, load_text
from quantpress.errors import CheckpointError, ConfigError
from quantpress.evaluation import Agreement, agreement, perplexity, token_windows
from quantpress.prompts import chat_formatter
from quantpress.pipeline import QuantizeReport, preflight, quantize
from quantpress.runtime.generate import Completion, complete
from quantpress.runtime.loader import LoadedModel, load
from quantpress.runtime.sampling import SamplingParams

__all__ = ["Agreement", "Completion", "EvalResult", "compare", "LoadedModel", "QuantizeReport", "SamplingParams", "bundled_model_dir",
           "default_seqlen", "evaluate", "generate", "load", "preflight", "quantize"]

DEFAULT_SEQLEN = 2048  # the GPTQ paper's calibration and evaluation window


def bundled_model_dir() -> Path:
    """The small Llama shipped with quantpress (trained by scripts/train_model.py)."""
    return Path(str(resources.files("quantpress") / "assets" / "models" / "tiny-llama"))


def default_seqlen(config: dict) -> int:
    """2048 as in the paper, or the model's context if shorter."""
    return min(DEFAULT_SEQLEN, int(config.get("max_position_embeddings", DEFAULT_SEQLEN)))


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    dataset: str
    seqlen: int
    windows: int
    seconds: float


def _as_loaded(model: str | Path | LoadedModel, *, exact: bool = False) -> LoadedModel:
    """Measurements load `exact`: they judge the quantized weights, not the bf16 decode kernels
    (and a window's numbers then do not depend on the batch size)."""
    return model if isinstance(model, LoadedModel) else load(model, exact=exact)


def evaluate(
    model: str | Path | LoadedModel,
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    *,
    max_windows: int | None = None,
    batch_size: int = 4,
    on_window=None,
) -> EvalResult:
    """Perplexity on a bundled set's evaluation split (wikitext-2 test) or any text file."""
    _check_eval_args(dataset, seqlen, max_windows)
    loaded = _as_loaded(model, exact=True)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path} has no tokenizer; cannot tokenize the evaluation text")
    seqlen = seqlen or default_seqlen(loaded.config)
    if loaded.max_length is not None and seqlen > loaded.max_length:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {loaded.max_length}")
    ids = tokenize(loaded.tokenizer, load_text(dataset, "evaluation"))
    started = time.perf_counter()
    windows = len(token_windows(ids, seqlen)[:max_windows])
    ppl = perplexity(loaded.model, ids, seqlen, batch_size=batch_size, max_windows=max_windows, on_window=on_window)
    return EvalResult(ppl, dataset, seqlen, windows, time.perf_counter() - started)


def _check_eval_args(dataset: str, seqlen: int | None, max_windows: int | None) -> None:
    """Before any model is loaded: the text exists and the window numbers make sense."""
    if seqlen is not None and seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    check_dataset(dataset)


def generate(model: str | Path | LoadedModel, prompt: str, params: SamplingParams = SamplingParams()) -> Completion:
    """Complete `prompt` with a full-precision or GPTQ model (temperature 0: greedy), on the engine
    `serve` and `chat` use: the same prompt, settings and seed give the same tokens there."""
    return complete(_as_loaded(model), prompt, params)


def compare(
    model: str | Path | LoadedModel,
    reference: str | Path | LoadedModel,
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    *,
    chat: bool = True,
    max_windows: int | None = None,
    batch_size: int = 4,
    on_window=None,
) -> Agreement:
    """KL divergence and top-1 agreement of `model` to `reference` (its full-precision source).

    With `chat`, the evaluation text is rendered as conversations in the reference's own prompt
    format (its chat_template): consecutive paragraphs become a user turn and the assistant's
    answer, which is how a chat model is used, special tokens and all."""
    _check_eval_args(dataset, seqlen, max_windows)
    ref, loaded = _as_loaded(reference, exact=True), _as_loaded(model, exact=True)
    if ref.tokenizer is None:
        raise CheckpointError(f"{ref.path} has no tokenizer; cannot tokenize the evaluation text")
    text = load_text(dataset, "evaluation")
    if chat:
        text = chat_transcript(chat_formatter(ref), text)
    seqlen = seqlen or default_seqlen(ref.config)
    ids = tokenize(ref.tokenizer, text)
    return agreement(loaded.model, ref.model, ids, seqlen, batch_size=batch_size, max_windows=max_windows,
                     on_window=on_window)


def chat_transcript(formatter, text: str) -> str:
    """`text`'s paragraphs as two-turn conversations (user: a paragraph, assistant: the next one),
    each rendered complete in `formatter`'s prompt format, concatenated."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith("=")]
    return "".join(
        formatter.render([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                         add_generation_prompt=False, continue_final=False)
        for user, answer in zip(paragraphs[0::2], paragraphs[1::2])
    )
