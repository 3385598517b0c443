"""The bundled default model (assets/models/tiny-llama) is complete, loads offline and is trained.

Built by scripts/train_model.py; these checks guard the shipped folder, not the script.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from quantpress.datasets import load_text
from quantpress.evaluation import perplexity

MODEL_DIR = Path(str(resources.files("quantpress") / "assets" / "models" / "tiny-llama"))
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "training_report.json",
}
# Measured 110.16 on the first 8 windows of 512 tokens for the shipped weights; ~10% headroom.
PPL_BOUND_8_WINDOWS = 121.0

SENTENCES = [
    "The quick brown fox jumps over the lazy dog, doesn't it? (1999: 42.5%)",
    "Grüße aus München: Der Bär läuft über die Straße — schön, oder?",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the Hub would fail the test instead of silently downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_folder_holds_only_what_a_loader_needs() -> None:
    assert {p.name for p in MODEL_DIR.iterdir()} == EXPECTED_FILES
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 12_000_000


def test_config_is_the_tiny_llama_preset() -> None:
    config = AutoConfig.from_pretrained(MODEL_DIR)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size) == (256, 768)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        4,
        4,
        2,
    )
    assert (config.vocab_size, config.max_position_embeddings) == (4096, 512)
    assert config.tie_word_embeddings is True
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["dtype"] == "bfloat16"


def test_weights_are_bfloat16_and_finite(model) -> None:
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("text", SENTENCES)
def test_tokenizer_round_trips_and_adds_no_bos(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_wikitext2_test_perplexity_is_far_below_unigram(tokenizer, model) -> None:
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    unigram = report["perplexity"]["wikitext2_test_unigram_ppl"]
    # The first 8 windows need only the first ~20k characters of the test text.
    text = load_text("wikitext2", "evaluation")[:40_000]
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    assert ids.numel() >= 8 * 512
    ppl = perplexity(model, ids, 512, max_windows=8)
    assert ppl < PPL_BOUND_8_WINDOWS
    assert ppl < unigram / 3
