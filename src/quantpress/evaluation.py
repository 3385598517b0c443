"""Perplexity exactly as the GPTQ paper reports it (spec B7), and agreement with a reference.

Tokenize the whole evaluation text once, cut it into non-overlapping windows of `seqlen` tokens
(the tail is dropped, no BOS is inserted), and report exp(mean NLL) where each window's NLL is
its mean cross-entropy over seqlen-1 predicted tokens times seqlen — the IST `llama_eval` formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    windows = token_windows(input_ids, seqlen)[:max_windows]
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


@dataclass(frozen=True)
class Agreement:
    """How closely a (quantized) model's next-token distributions follow a reference's."""

    kl_divergence: float  # mean over predicted tokens of KL(p_reference || p_model), in nats
    top1: float  # fraction of predicted tokens where both models' most likely token is the same
    tokens: int  # predicted tokens compared


@torch.inference_mode()
def agreement(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    input_ids: Tensor,
    seqlen: int,
    *,
    batch_size: int = 4,
    max_windows: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> Agreement:
    """KL divergence and top-1 agreement of `model` to `reference` on the same windows as
    `perplexity`. Unlike perplexity, which a quantized model can match while disagreeing token by
    token, these compare the two distributions directly: 0 and 1.0 mean identical predictions."""
    windows = token_windows(input_ids, seqlen)[:max_windows]
    kl = agree = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]  # (B, T)
        logp = model(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        ref = reference(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        kl += float((ref.exp() * (ref - logp)).sum())
        agree += float((logp.argmax(-1) == ref.argmax(-1)).sum())
        if on_window is not None:
            on_window(min(start + batch_size, len(windows)), len(windows))
    tokens = len(windows) * (seqlen - 1)
    if not math.isfinite(kl):
        raise CalibrationError("KL divergence is not finite: a model produced NaN/Inf logits")
    return Agreement(kl / tokens, agree / tokens, tokens)
