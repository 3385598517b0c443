"""The min-max quantizer (spec B1) and round-to-nearest built on it."""

from __future__ import annotations


import pytest
import torch

from quantpress.config import QuantConfig
from quantpress.errors import NonFiniteError
from quantpress.quant.quantizer import FP16_TINY, find_params, group_params, max_level, quantize
from quantpress.quant.rtn import rtn_quantize


BITS = (2, 3, 4, 8)


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[0] = W[0].abs()  # a row with no negative value (sym keeps xmin = 0 there)
    W[1] = 0.0  # an all-zero row
    W[2, 5] = 0.5  # an outlier
    return W


def _is_fp16(x: torch.Tensor) -> bool:
    return torch.equal(x.half().float(), x)


# --- find_params ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_find_params_contract(bits: int, sym: bool, mse: bool) -> None:
    x = _weights(16, 64)
    scale, zero = find_params(x, bits, sym, mse=mse)
    maxq = max_level(bits)
    assert scale.shape == zero.shape == (16,)
    assert scale.dtype == zero.dtype == torch.float32
    assert _is_fp16(scale) and (scale > 0).all()
    assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= maxq).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()  # exactly: Marlin ignores qzeros and assumes it


@pytest.mark.parametrize("bits", BITS)
def test_find_params_min_max_formula(bits: int) -> None:
    maxq = max_level(bits)
    x = torch.tensor([[-0.3, 0.1, 0.2], [0.05, 0.4, 0.2], [0.0, 0.0, 0.0], [-0.2, -0.1, -0.4]])
    # asym: the range always includes 0, scale = (xmax - xmin) / maxq, zero = round(-xmin / scale)
    scale, zero = find_params(x, bits, sym=False)
    xmin = torch.tensor([-0.3, 0.0, -1.0, -0.4])
    xmax = torch.tensor([0.2, 0.4, 1.0, 0.0])
    expected = ((xmax - xmin) / maxq).half().float()
    assert torch.equal(scale, expected)
    assert torch.equal(zero, torch.round(-xmin / expected).clamp(0, maxq))
    # sym: +-amax, except a row with no negative value keeps xmin = 0 (spec B1 note)
    scale, _ = find_params(x, bits, sym=True)
    expected = (torch.tensor([0.6, 0.4, 2.0, 0.8]) / maxq).half().float()
    assert torch.equal(scale, expected)


def test_tiny_scale_is_raised_to_smallest_fp16() -> None:
    x = torch.tensor([[1e-12, -2e-12, 3e-12], [1e-30, 0.0, 0.0]])
    scale, zero = find_params(x, 4, sym=False)
    assert (scale == FP16_TINY).all()  # not 0: no division by zero, a valid stored scale
    _, fake = quantize(x, scale[:, None], zero[:, None], max_level(4))
    assert torch.isfinite(fake).all() and (fake == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_non_finite_or_fp16_overflowing_scale_raises(bad: float) -> None:
    x = torch.zeros(3, 8)
    x[1, 2] = bad  # 1e6: the 4-bit scale 2e6/15 exceeds the fp16 maximum
    with pytest.raises(NonFiniteError):
        find_params(x, 4, sym=True)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_never_worse_than_min_max(sym: bool) -> None:
    x = _weights(32, 128, seed=1)
    maxq = max_level(3)

    def err(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        _, fake = quantize(x, scale[:, None], zero[:, None], maxq)
        return (fake - x).abs().pow(2.4).sum(dim=1)

    plain, searched = find_params(x, 3, sym), find_params(x, 3, sym, mse=True)
    assert (err(*searched) <= err(*plain)).all()
    assert (searched[0] <= plain[0]).all()  # it only ever shrinks the range
    assert (err(*searched) < err(*plain)).any()  # and the outlier row does gain


# --- quantize -------------------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_clamps() -> None:
    scale, zero = torch.tensor([1.0]), torch.tensor([8.0])
    x = torch.tensor([[2.5, 3.5, -2.5, 100.0, -100.0]])
    q, fake = quantize(x, scale[:, None], zero[:, None], 15)
    assert q.dtype == torch.int32
    assert q.tolist() == [[10, 12, 6, 15, 0]]  # torch.round ties to even, as IST/AutoGPTQ
    assert fake.tolist() == [[2.0, 4.0, -2.0, 7.0, -8.0]]


def test_quantize_column_with_per_row_params() -> None:
    x = _weights(16, 32)
    scale, zero = find_params(x, 4, sym=False)
    q_all, fake_all = quantize(x, scale[:, None], zero[:, None], 15)
    q_col, fake_col = quantize(x[:, 7], scale, zero, 15)  # how the GPTQ loop calls it
    assert torch.equal(q_col, q_all[:, 7]) and torch.equal(fake_col, fake_all[:, 7])


# --- group_params and RTN -------------------------------------------------------------------------


@pytest.mark.parametrize("K,gs", [(128, 32), (96, 64), (64, 128)])
def test_group_params_equals_per_group_find_params(K: int, gs: int) -> None:
    W = _weights(8, K)
    scale, zero = group_params(W, gs, bits=4, sym=False)
    assert scale.shape == zero.shape == (-(-K // gs), 8)
    for g, start in enumerate(range(0, K, gs)):
        s, z = find_params(W[:, start : start + gs], 4, sym=False)
        assert torch.equal(scale[g], s) and torch.equal(zero[g], z)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn(bits: int, group_size: int, sym: bool) -> None:
    N, K = 24, 96
    W = _weights(N, K, seed=bits)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_order=True)  # act_order ignored
    qw = rtn_quantize(W.bfloat16(), cfg)  # any float dtype in
    W = W.bfloat16().float()
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    maxq = max_level(bits)

    assert qw.intweight.shape == (N, K) and qw.intweight.dtype == torch.int32
    assert qw.scales.shape == (G, N) and qw.scales.dtype == torch.float16
    assert qw.zeros.shape == (G, N) and qw.zeros.dtype == torch.int32
    assert torch.equal(qw.g_idx, torch.arange(K, dtype=torch.int32) // gs)
    assert qw.intweight.min() >= 0 and qw.intweight.max() <= maxq
    # the stored params are exactly find_params' for each group
    for g in range(G):
        scale, zero = find_params(W[:, g * gs : (g + 1) * gs], bits, sym)
        assert torch.equal(qw.scales[g].float(), scale) and torch.equal(qw.zeros[g].float(), zero)
    # nearest level: error <= scale/2 wherever the value is not clipped
    scale = qw.scales.float()[qw.g_idx.long()].t()
    zero = qw.zeros[qw.g_idx.long()].t().float()
    level = W / scale + zero
    inside = (level > -0.5) & (level < maxq + 0.5)
    err = (qw.dequantize() - W).abs()
    assert (err[inside] <= scale[inside] / 2 * (1 + 1e-6)).all()
    if sym:
        # IST quirk kept (B1): a group with no negative value gets scale = xmax/maxq but zero
        # 2^(b-1), so its top half is clipped at (2^(b-1) - 1) * scale. Row 0 is such a row.
        top = (2 ** (bits - 1) - 1) * qw.scales[:, 0].float()
        assert torch.equal(qw.dequantize()[0].view(G, -1).amax(dim=1), top)
        inside[0], err[0] = True, 0.0
    # otherwise only group extremes are clipped (sym top edge; fp16 rounding of the scale), barely
    assert (~inside).sum() <= 2 * N * G
    assert (err[~inside] <= scale[~inside] * (0.5 + maxq * 2.0**-10)).all()
    # and the result is the same integer grid `quantize` produces
    q, fake = quantize(W, scale, zero, maxq)
    assert torch.equal(q, qw.intweight) and torch.equal(fake, qw.dequantize())


def test_rtn_rejects_non_finite() -> None:
    W = torch.zeros(4, 32)
    W[2, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        rtn_quantize(W, QuantConfig(bits=4, group_size=32))
