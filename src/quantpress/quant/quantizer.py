"""The asymmetric/symmetric min-max grid quantizer of GPTQ (spec B1), vectorized over rows.

Pure tensor math shared by GPTQ and RTN. One row of `x` is one quantization group of one output
channel: `find_params` picks a per-row grid, `quantize` snaps values onto it.

Deliberate differences from IST/AutoGPTQ `Quantizer`, all in the direction of "what is computed is
what is stored":
  - the scale is rounded to fp16 (the checkpoint's dtype) before the zero point is derived and
    before anything is quantized with it, so GPTQ's error feedback sees exactly the dequantized
    checkpoint weight; a scale too small for fp16 becomes the smallest positive fp16 value, one too
    large raises `NonFiniteError` (IST would silently store 0 or inf);
  - the asym zero point is clamped into [0, maxq] after that rounding;
  - the MSE search rounds every candidate scale the same way, so it ranks the grids actually stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantpress.errors import ConfigError, NonFiniteError

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive (subnormal) fp16 value


def max_level(bits: int) -> int:
    """The largest integer level of a `bits`-bit grid: maxq = 2^bits - 1."""
    return (1 << bits) - 1


def _stored_scale(scale: Tensor) -> Tensor:
    """Round fp32 scales to the fp16 values the checkpoint will hold, returned as fp32."""
    scale_h = scale.half()
    if not torch.isfinite(scale_h).all():
        worst = scale[~torch.isfinite(scale_h)][0].item()
        raise NonFiniteError(
            f"quantization scale {worst:g} is NaN/Inf or exceeds the fp16 maximum {FP16_MAX:g}; "
            "the weight has non-finite or enormous values"
        )
    # a positive scale below half the smallest subnormal rounds to 0 and would divide by zero
    return scale_h.float().clamp_min_(FP16_TINY)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Snap `x` onto the grid `scale * (q - zero)`, q in [0, maxq]; returns (q int32, fake fp32).

    `scale` and `zero` (fp32, zero integer-valued) broadcast against `x`: [rows] for a column
    `x` of shape [rows], [rows, 1] for x [rows, cols], or the full shape of `x`.
    `fake` is computed as `scale * (q - zero)` in fp32, the same ops as
    `QuantizedWeight.dequantize`, so the two are bit-identical.
    Rounding is torch.round (half to even), as in IST/AutoGPTQ.
    """
    q = torch.div(x, scale).round_().add_(zero).clamp_(0, maxq)  # float, integer-valued
    fake = (q - zero).mul_(scale)  # (q - zero) is exact in fp32, and a*b == b*a in IEEE
    return q.to(torch.int32), fake


def find_params(
    x: Tensor,
    bits: int,
    sym: bool,
    *,
    mse: bool = False,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row min-max grid for x [rows, cols]; returns (scale [rows], zero [rows]), both fp32.

    `scale` holds fp16-representable values, at least the smallest positive fp16.
    `zero` is integer-valued in [0, 2^bits - 1]; for `sym` it is exactly 2^(bits-1) (Marlin
    and the v1 qzeros constants assume it). With `mse`, each row independently takes the
    shrunken range p*[xmin, xmax], p = 1, 1-1/grid, ..., that minimises sum |fake - x|^norm,
    each column's term weighted by `importance` ([cols] or [rows, cols], e.g. diag(H)) if given.
    Raises `NonFiniteError` if x has NaN/Inf or a scale would overflow fp16.
    """
    maxq = max_level(bits)
    x = x.float()
    # the grid always contains 0 exactly: widen [min, max] to include it
    xmin = x.amin(dim=1).clamp_max_(0)
    xmax = x.amax(dim=1).clamp_min_(0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)  # rows with no negative value keep xmin = 0
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a valid grid
    xmin = xmin.masked_fill(empty, -1.0)
    xmax = xmax.masked_fill(empty, 1.0)

    def grid_for(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        scale = _stored_scale((hi - lo) / maxq)
        if sym:
            zero = torch.full_like(scale, float((maxq + 1) // 2))
        else:
            zero = torch.round(-lo / scale).clamp_(0, maxq)
        return scale, zero

    scale, zero = grid_for(xmin, xmax)
    if not mse:
        return scale, zero

    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1, zero1 = grid_for(p * xmin, p * xmax)
        _, fake = quantize(x, scale1[:, None], zero1[:, None], maxq)
        err = fake.sub_(x).abs_().pow_(norm)
        err = (err if importance is None else err.mul_(importance)).sum(dim=1)  # [rows]
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
    return scale, zero


def group_params(
    W: Tensor, group_size: int, *, bits: int, sym: bool, mse: bool = False, importance: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """find_params for the natural contiguous groups of W [N, K]: (scale [G, N], zero [G, N]).

    G = ceil(K / group_size); the last group is narrower when group_size does not divide K.
    Vectorized: all full groups in one call, the remainder in a second. `importance` [K] weights
    the MSE search's error per input column.
    """
    if group_size <= 0:
        raise ConfigError(f"group_size must be positive here, got {group_size}")
    N, K = W.shape
    full = K // group_size * group_size
    G_full = full // group_size
    # (N, G, gs) -> (G, N, gs) -> (G*N, gs): one row per (group, output channel)
    rows = W[:, :full].reshape(N, G_full, group_size).transpose(0, 1).reshape(-1, group_size)
    weights = None if importance is None else importance[:full].reshape(G_full, 1, group_size).expand(
        G_full, N, group_size).reshape(-1, group_size)
    scale, zero = find_params(rows, bits, sym, mse=mse, importance=weights)
    scale, zero = scale.view(G_full, N), zero.view(G_full, N)
    if full < K:
        tail_scale, tail_zero = find_params(W[:, full:], bits, sym, mse=mse,
                                            importance=None if importance is None else importance[full:])
        scale = torch.cat([scale, tail_scale[None]])
        zero = torch.cat([zero, tail_zero[None]])
    return scale, zero
