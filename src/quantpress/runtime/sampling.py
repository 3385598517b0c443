"""Token sampling: temperature, top-k, top-p, typical-p, repetition penalty — small pure functions.

Each request carries its own `torch.Generator`, so a seeded request samples the same tokens
whatever else runs in the process (no global RNG state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantpress.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1.0 disables
    top_k: int = 0  # 0 disables
    repetition_penalty: float = 1.0  # CTRL-style; 1.0 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def typical_p_filter(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling (Meister et al. 2022), as transformers' TypicalLogitsWarper: keep
    the tokens whose surprisal is closest to the distribution's entropy, up to probability `mass`.
    `logits` [..., vocab]."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)  # nansum: -inf logits give 0 * -inf
    distance, order = torch.sort((-logp - entropy).abs(), dim=-1)  # most typical first
    cumulative = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # first index reaching mass
    drop_sorted = distance > distance.gather(-1, last)
    drop_sorted[..., :1] = False  # always keep the most typical token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def warp(logits: Tensor, temperature: float, top_k: int, top_p: float, typical_p: float) -> Tensor:
    """Temperature, then top-k, top-p and typical-p filtering: the order of transformers' and TGI's
    logits warpers. 1.0 / 0 / 1.0 / 1.0 disable each."""
    if temperature != 1.0:
        logits = logits / temperature
    return typical_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), typical_p)


def sample_next(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Choose the next token from 1-D `logits` [vocab] given the token ids `seen` so far."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = warp(logits, params.temperature, params.top_k, params.top_p, typical_p=1.0)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
