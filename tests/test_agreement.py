"""KL divergence and top-1 agreement to a full-precision reference (issue 12's second measure)."""

from __future__ import annotations

import math

import pytest
import torch

import quantpress
from quantpress import QuantConfig, api
from quantpress.evaluation import agreement
from quantpress.prompts import folder_formatter


@pytest.fixture(scope="module")
def rtn2(tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn") / "q"
    quantpress.quantize(quantpress.bundled_model_dir(), out, QuantConfig(bits=2, group_size=64, method="rtn"), None)
    return quantpress.load(out, exact=True)


def test_a_model_agrees_with_itself_exactly(loaded):
    result = api.compare(loaded, loaded, seqlen=128, max_windows=2)
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-6) and result.top1 == 1.0
    assert result.tokens == 2 * 127


def test_kl_and_top1_match_a_direct_computation(loaded, rtn2):
    ids = torch.randint(4, 200, (300,))
    result = agreement(rtn2.model, loaded.model, ids, 100, batch_size=2)
    with torch.inference_mode():
        p = loaded.model(input_ids=ids[:300].view(3, 100)).logits[:, :-1].double().softmax(-1)
        q = rtn2.model(input_ids=ids[:300].view(3, 100)).logits[:, :-1].double().softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert result.kl_divergence == pytest.approx(kl, rel=1e-4) and result.kl_divergence > 0.01
    assert result.top1 == pytest.approx(top1) and result.top1 < 1.0
    assert result.tokens == 3 * 99


def test_quantized_agreement_is_worse_than_identity_but_sane(loaded, rtn2):
    result = api.compare(rtn2, loaded, seqlen=128, max_windows=4)
    assert 0 < result.kl_divergence < 5 and 0.2 < result.top1 < 1.0 and math.isfinite(result.kl_divergence)


def test_chat_transcript_renders_whole_conversations_in_the_format():
    formatter = folder_formatter(quantpress.bundled_model_dir(), None, "chatml")
    text = api.chat_transcript(formatter, "= Title =\n\nfirst para\n\nsecond para\n\nthird\n\nfourth")
    assert text.count("<|im_start|>user\nfirst para<|im_end|>") == 1
    assert text.count("<|im_start|>assistant\nsecond para<|im_end|>") == 1
    assert "third" in text and "fourth" in text and "Title" not in text
