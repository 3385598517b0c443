"""The sampler at the edges of what validation accepts (issue 11, finding 8).

Validation and sampler agree: NaN and infinity are refused up front, and every finite value that
is accepted samples a token, including temperatures and top_p that float32 rounds to 0 and
penalties it rounds to 0 or inf. A vanishing temperature is greedy in the limit, and so is
a vanishing top_p.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from quantpress.errors import ConfigError
from quantpress.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    sample_next,
    top_p_filter,
    typical_p_filter,
    warp,
)

VOCAB = 1000


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 5


def generators(n: int = 8):
    return (torch.Generator().manual_seed(seed) for seed in range(n))


@pytest.mark.parametrize("field", ["temperature", "top_p", "typical_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_sampling_params_refuse_non_finite_values(field, value):
    with pytest.raises(ConfigError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})


def test_temperature_zero_is_the_one_greedy_convention():
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-300).greedy
    assert not SamplingParams().greedy  # the default samples at 0.7
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1e-300)


def test_a_vanishing_temperature_is_greedy(logits):
    seen = torch.arange(0, VOCAB, 7)
    greedy = int(apply_repetition_penalty(logits, seen, 1.3).argmax())
    for temperature in (1e-300, 1e-45, 1e-30):
        params = SamplingParams(temperature=temperature, repetition_penalty=1.3)
        assert {sample_next(logits, seen, params, g) for g in generators()} == {greedy}
    assert sample_next(logits, seen, SamplingParams(temperature=0, repetition_penalty=1.3), None) == greedy


def test_temperature_shifts_the_maximum_to_zero_and_never_makes_nan(logits):
    for temperature in (1e-300, 1e-20, 0.5, 2.0, 1e20, 1e300):
        scaled = apply_temperature(logits, temperature)
        assert not scaled.isnan().any() and scaled.max() == 0
        assert torch.allclose(scaled.softmax(-1), (logits.double() / temperature).softmax(-1).float(), atol=1e-6)


def test_a_vanishing_top_p_keeps_only_the_most_likely_token(logits):
    kept = torch.isfinite(top_p_filter(logits, 1e-300))
    assert kept.sum() == 1 and kept[logits.argmax()]
    params = SamplingParams(top_p=1e-300)
    assert {sample_next(logits, torch.empty(0, dtype=torch.long), params, g) for g in generators()} == {
        int(logits.argmax())}


@pytest.mark.parametrize("penalty", [1e-308, 1e-40, 1e40, 1e308])
def test_extreme_repetition_penalties_stay_finite(logits, penalty):
    seen = torch.arange(VOCAB)  # every token seen: a huge penalty may not rule them all out
    penalised = apply_repetition_penalty(logits, seen, penalty)
    assert torch.isfinite(penalised).all()
    assert logits[penalised.argmax()] > 0  # positive logits stay above negative ones, as for any penalty
    zero = apply_repetition_penalty(torch.zeros(4), torch.arange(4), penalty)  # 0 * inf must not be NaN
    assert torch.equal(zero, torch.zeros(4))


TEMPERATURES = [1e-300, 1e-10, 1.0, 1e300]
TOP_PS = [1e-300, 0.5, 1.0]
TYPICAL_PS = [1e-300, 0.5, 1.0]
PENALTIES = [1e-308, 1.0, 1e308]


@pytest.mark.parametrize(("temperature", "top_p", "typical_p", "penalty"),
                         list(itertools.product(TEMPERATURES, TOP_PS, TYPICAL_PS, PENALTIES)))
def test_every_accepted_combination_samples_a_token(logits, temperature, top_p, typical_p, penalty):
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=50, top_p=top_p,
                            typical_p=typical_p, repetition_penalty=penalty)
    seen = torch.arange(0, VOCAB, 3)
    probs = warp(apply_repetition_penalty(logits, seen, penalty), temperature, 50, top_p, typical_p).softmax(-1)
    assert torch.isfinite(probs).all() and probs.sum() == pytest.approx(1.0, abs=1e-4)
    assert 0 <= sample_next(logits, seen, params, torch.Generator().manual_seed(1)) < VOCAB


def test_typical_p_keeps_at_least_one_token_at_a_vanishing_mass(logits):
    assert torch.isfinite(typical_p_filter(logits, 1e-300)).sum() >= 1
