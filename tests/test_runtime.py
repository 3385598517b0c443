"""Perplexity protocol, sampling and generation on CPU."""

from __future__ import annotations

import math

import pytest
import torch

import quantpress
from peers.tiny_models import eval_ids
from quantpress import CalibrationConfig, QuantConfig, SamplingParams
from quantpress.errors import ConfigError, PromptTooLong
from quantpress.evaluation import perplexity
from quantpress.runtime.engine import Engine
from quantpress.runtime.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from reference.generate_loop import reference_generate


def test_perplexity_follows_the_paper_protocol(tiny_llama):
    model = quantpress.load(tiny_llama).model
    ids = eval_ids(1, 100, seed=7)[0]  # 100 tokens, seqlen 32 -> 3 windows, 4-token tail dropped
    nll = 0.0
    with torch.inference_mode():
        for w in range(3):
            window = ids[w * 32 : (w + 1) * 32]
            logits = model(input_ids=window[None]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], window[1:]).item() * 32
    expected = math.exp(nll / (3 * 32))
    assert perplexity(model, ids, 32, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, 32, max_windows=1) != pytest.approx(expected, rel=1e-3)


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, -1.0])
    assert torch.isinf(top_k_filter(logits, 2)[2:]).all() and torch.isfinite(top_k_filter(logits, 2)[:2]).all()
    probs = logits.softmax(-1)  # [0.64, 0.24, 0.09, ...]: top_p 0.8 keeps the first two
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [True, True, False, False, False] and probs[:1].sum() < 0.8 <= probs[:2].sum()
    penalised = apply_repetition_penalty(logits, torch.tensor([0, 4]), 2.0)
    assert penalised.tolist() == [2.0, 3.0, 2.0, 1.0, -2.0]


def test_greedy_generation_matches_transformers(tiny_llama):
    """The reference loop (the oracle of every generation path) and the engine agree with transformers."""
    loaded = quantpress.load(tiny_llama)
    prompt = eval_ids(1, 12)[0]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    oracle = reference_generate(loaded, prompt.tolist(), params)
    with torch.inference_mode():
        ref = loaded.model.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=3)[0, 12:].tolist()
    assert oracle == ref[: len(oracle)]
    with Engine(loaded) as engine:
        assert [e.id for e in engine.submit(prompt.tolist(), params)] == oracle


def test_seeded_sampling_is_reproducible_and_seed_dependent(tmp_path, tiny_llama, examples):
    out = quantpress.quantize(tiny_llama, tmp_path / "q", QuantConfig(bits=4, group_size=32),
                              CalibrationConfig(nsamples=8, seqlen=64), examples=examples).out_dir
    loaded = quantpress.load(out)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=3)
    first = quantpress.generate(loaded, "t10 t11 t12", params)
    assert first == quantpress.generate(loaded, "t10 t11 t12", params)
    other = quantpress.generate(loaded, "t10 t11 t12", SamplingParams(**{**params.__dict__, "seed": 4}))
    assert other.token_ids != first.token_ids
    assert first.prompt_tokens == 3 and first.finish_reason in ("length", "eos_token")


def test_prompt_longer_than_the_model_allows(tiny_llama):
    loaded = quantpress.load(tiny_llama)
    long_prompt = " ".join(f"t{4 + i % 100}" for i in range(250))
    with pytest.raises(PromptTooLong, match="exceeds the model's limit of 256"):
        quantpress.generate(loaded, long_prompt, SamplingParams(max_new_tokens=10))
    with pytest.raises(ConfigError):
        SamplingParams(max_new_tokens=-1)
