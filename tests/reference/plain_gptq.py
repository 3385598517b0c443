"""A frozen, deliberately simple GPTQ: the test oracle for `quantpress.quant.gptq`.

Written from the algorithm's definition, not from our implementation: no lazy batching, no
transposed buffers, no cleverness. After each column is quantized its scaled error is pushed into
*all* remaining columns at once with the full row of U (the upper Cholesky factor of H^-1, computed
the IST way). `block_size` only models IST's group-param timing quirk: a group's grid comes from
the weights as they stood at the start of the enclosing lazy block. Min-max grids only (no MSE).
Do not optimise or "fix" this file: its value is that it is obviously right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PlainResult:
    intweight: Tensor  # [N, K] int64, original column order
    fake: Tensor  # [N, K] fp32, original column order
    scales: Tensor  # [G, N] fp32 (fp16-representable)
    zeros: Tensor  # [G, N] fp32, integer-valued
    g_idx: Tensor  # [K] int64
    loss: float


def minmax_grid(x: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) of the GPTQ min-max quantizer, scale rounded to fp16 storage."""
    maxq = 2**bits - 1
    lo = torch.clamp(x.min(dim=1).values, max=0.0)
    hi = torch.clamp(x.max(dim=1).values, min=0.0)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        hi = amax
        lo = torch.where(lo < 0, -amax, torch.zeros_like(lo))
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, torch.full_like(lo, -1.0), lo)
    hi = torch.where(both_zero, torch.full_like(hi, 1.0), hi)
    scale = ((hi - lo) / maxq).half().float().clamp(min=2.0**-24)
    if sym:
        zero = torch.full_like(scale, 2.0 ** (bits - 1))
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def plain_gptq(
    W: Tensor,
    H: Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    static_groups: bool,
    damp_percent: float,
    block_size: int,
) -> PlainResult:
    W = W.float().clone()
    H = H.float().clone()
    N, K = W.shape
    maxq = 2**bits - 1
    gs = K if group_size == -1 else group_size

    if group_size == -1:
        row_grid = minmax_grid(W, bits, sym)  # taken before dead columns are zeroed, like IST

    for k in range(K):
        if H[k, k] == 0:  # an input that never fired
            H[k, k] = 1.0
            W[:, k] = 0.0

    if group_size != -1 and static_groups:
        static_grids = [minmax_grid(W[:, s : s + gs], bits, sym) for s in range(0, K, gs)]

    if act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    else:
        order = torch.arange(K)
    W = W[:, order]
    H = H[order][:, order]

    H = H + damp_percent * torch.mean(torch.diagonal(H)) * torch.eye(K)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)

    Q = torch.zeros(N, K)
    Qint = torch.zeros(N, K, dtype=torch.int64)
    scales, zeros = [], []
    loss = 0.0
    for j in range(K):
        if j % block_size == 0:
            W_at_block_start = W.clone()
        if group_size == -1:
            scale, zero = row_grid
        elif static_groups:
            scale, zero = static_grids[int(order[j]) // gs]
        elif j % gs == 0:
            scale, zero = minmax_grid(W_at_block_start[:, j : j + gs], bits, sym)
            scales.append(scale)
            zeros.append(zero)
        q_int = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        q = scale * (q_int - zero)
        err = (W[:, j] - q) / U[j, j]
        loss += float((err**2).sum()) / 2
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
        Q[:, j] = q
        Qint[:, j] = q_int.long()

    if group_size == -1:
        scales, zeros = [row_grid[0]], [row_grid[1]]
    elif static_groups:
        scales = [g[0] for g in static_grids]
        zeros = [g[1] for g in static_grids]

    position = torch.argsort(order)  # position[k]: where input channel k was quantized
    if group_size != -1 and not static_groups:
        g_idx = position // gs
    else:
        g_idx = torch.arange(K) // gs
    return PlainResult(
        intweight=Qint[:, position],
        fake=Q[:, position],
        scales=torch.stack(scales),
        zeros=torch.stack(zeros),
        g_idx=g_idx,
        loss=loss,
    )
