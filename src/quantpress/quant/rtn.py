"""Round-to-nearest: the GPTQ quantizer and grouping without error feedback (the baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from quantpress.config import QuantConfig
from quantpress.errors import NonFiniteError
from quantpress.quant.qweight import QuantizedWeight
from quantpress.quant.quantizer import group_params, max_level, quantize


@torch.no_grad()
def rtn_quantize(W: Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """Quantize W [N, K] (out, in) group by group with the min-max grid of `find_params`.

    Uses cfg.bits, group_size, sym and mse; act_order and static_groups need a Hessian and are
    ignored, so g_idx[k] = k // group_size (all zeros for group_size -1). W may be any float dtype
    and is not modified. Raises NonFiniteError for NaN/Inf in W.
    """
    if not torch.isfinite(W).all():
        raise NonFiniteError("weight contains NaN/Inf")
    N, K = W.shape
    gs = K if cfg.group_size == -1 else cfg.group_size
    W = W.float()
    scale, zero = group_params(W, gs, bits=cfg.bits, sym=cfg.sym, mse=cfg.mse)  # (G, N)
    g_idx = torch.arange(K, device=W.device) // gs  # (K,)
    # expand the per-group params to (N, K) and quantize everything in one pass; gathering along
    # dim 1 keeps them contiguous (a transposed (K, N) gather makes the elementwise ops ~4x slower)
    intweight, _ = quantize(W, scale.t()[:, g_idx], zero.t()[:, g_idx], max_level(cfg.bits))
    return QuantizedWeight(
        intweight=intweight,
        scales=scale.half(),  # exact: find_params returns fp16 values
        zeros=zero.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=cfg.bits,
    )
