"""Issue 12's quality levers, each against what it promises: weighted range search, group-aware
reordering, per-module damping."""

from __future__ import annotations

import pytest
import torch

from quantpress.config import QuantConfig
from quantpress.errors import ConfigError
from quantpress.quant.gptq import DAMP_GRID, gptq_quantize, group_aware_order, output_error
from quantpress.quant.quantizer import find_params, quantize


def planted(N=48, K=256, seed=0):
    """A weight and a Hessian with a few outlier input channels, like LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(2048, K, generator=g)
    X[:, torch.randperm(K, generator=g)[:6]] *= 20  # massive activations on a few channels
    return W, 2 / 2048 * X.t() @ X


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_range_search_never_increases_the_weighted_error(bits):
    W, H = planted()
    importance = H.diagonal()
    rows, weights = W.reshape(-1, 32), importance.reshape(1, -1, 32).expand(48, -1, -1).reshape(-1, 32)

    def weighted_error(scale, zero):
        _, fake = quantize(rows, scale[:, None], zero[:, None], (1 << bits) - 1)
        return ((fake - rows).abs().pow(2.4) * weights).sum(1)

    minmax = weighted_error(*find_params(rows, bits, sym=False))
    searched = weighted_error(*find_params(rows, bits, sym=False, mse=True, importance=weights))
    assert (searched <= minmax + 1e-3).all() and searched.sum() < 0.99 * minmax.sum()


def test_group_aware_order_keeps_groups_whole_and_ranks_them():
    diag = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 0.5, 4.0, 8.0, 7.0, 6.0])
    order = group_aware_order(diag, 4)
    # groups {0..3} (max 9) and {4..7} (max 8); the partial group {8, 9} stays last
    assert order.tolist() == [3, 1, 2, 0, 7, 6, 4, 5, 8, 9]


@pytest.mark.parametrize("K", [256, 272])  # 272: a last partial group of 16
def test_group_aware_gptq_stores_a_trivial_g_idx_and_exact_weights(K):
    W, H = planted(K=K)
    result = gptq_quantize(W, H, QuantConfig(bits=3, group_size=32, group_aware=True, sym=False))
    assert torch.equal(result.weight.g_idx, torch.arange(K, dtype=torch.int32) // 32)
    assert torch.equal(result.weight.dequantize(), result.fake)
    plain = gptq_quantize(W, H, QuantConfig(bits=3, group_size=32, sym=False))
    assert output_error(W, result.fake, H) < output_error(W, plain.fake, H)


def test_static_act_order_stores_a_trivial_g_idx():
    W, H = planted()
    result = gptq_quantize(W, H, QuantConfig(bits=4, group_size=32, act_order=True, static_groups=True))
    assert torch.equal(result.weight.g_idx, torch.arange(256, dtype=torch.int32) // 32)
    assert torch.equal(result.weight.dequantize(), result.fake)


def test_damp_search_returns_the_grid_point_with_the_lowest_output_error():
    W, H = planted()
    cfg = QuantConfig(bits=2, group_size=64)
    errors = {d: output_error(W, gptq_quantize(W, H, QuantConfig(bits=2, group_size=64, damp_percent=d)).fake, H)
              for d in DAMP_GRID}
    searched = gptq_quantize(W, H, QuantConfig(bits=2, group_size=64, damp_search=True))
    assert searched.damp_percent == min(errors, key=errors.get)
    assert output_error(W, searched.fake, H) == pytest.approx(min(errors.values()))
    assert output_error(W, searched.fake, H) <= output_error(W, gptq_quantize(W, H, cfg).fake, H)


def test_lever_combinations_that_cannot_work_are_refused():
    for bad in (dict(mse_weighted=True), dict(group_aware=True, act_order=True), dict(group_aware=True, group_size=-1),
                dict(method="rtn", damp_search=True)):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
