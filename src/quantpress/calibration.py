"""Calibration token windows, sampled the way the GPTQ reference code samples them (spec B6)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from quantpress.config import CalibrationConfig
from quantpress.datasets import load_text
from quantpress.errors import CalibrationError


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text as one 1-D int64 token tensor (tokenized once, as the paper does)."""
    # verbose=False: a corpus is longer than model_max_length by design; windows are cut later.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return ids.to(torch.int64)


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """[nsamples, seqlen] windows starting at `random.Random(seed).randint(0, n - seqlen - 1)`."""
    n = tokens.numel()
    if n <= seqlen:
        raise CalibrationError(
            f"calibration text has {n} tokens; at least {seqlen + 1} are needed for windows of "
            f"{seqlen} (use a longer text or a smaller --seqlen)"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def calibration_examples(tokenizer, calibration: CalibrationConfig) -> Tensor:
    text = load_text(calibration.dataset, "calibration")
    return sample_windows(tokenize(tokenizer, text), calibration.nsamples, calibration.seqlen, calibration.seed)
