"""Perplexity exactly as the GPTQ paper reports it (spec B7).

Tokenize the whole evaluation text once, cut it into non-overlapping windows of `seqlen` tokens
(the tail is dropped, no BOS is inserted), and report exp(mean NLL) where each window's NLL is
its mean cross-entropy over seqlen-1 predicted tokens times seqlen — the IST `llama_eval` formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from quantpress.errors import CalibrationError


def token_windows(input_ids: Tensor, seqlen: int) -> Tensor:
    """[n_windows, seqlen] non-overlapping windows of a 1-D token tensor, tail dropped."""
    n = input_ids.numel() // seqlen
    if n == 0:
        raise CalibrationError(
            f"evaluation text has {input_ids.numel()} tokens, fewer than one window of {seqlen}"
        )
    return input_ids[: n * seqlen].view(n, seqlen)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: Tensor,
    seqlen: int,
    *,
    batch_size: int = 4,
    max_windows: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> float:
    """Perplexity of a causal LM (HF-style: `model(input_ids).logits`) on a 1-D token tensor."""
    windows = token_windows(input_ids, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    total_nll = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]  # (B, T)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
        # Mean CE over the T-1 predicted positions of each window, times T (paper's weighting).
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none"
        ).mean(dim=1)
        total_nll += float(nll.sum()) * seqlen
        if on_window is not None:
            on_window(min(start + batch_size, len(windows)), len(windows))
    ppl = math.exp(total_nll / (len(windows) * seqlen))
    if not math.isfinite(ppl):
        raise CalibrationError("perplexity is not finite: the model produced NaN/Inf logits")
    return ppl
