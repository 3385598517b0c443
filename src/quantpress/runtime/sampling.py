"""Token sampling: the one parameter type and the one sampler every generation path uses.

`SamplingParams` is what `quantpress.generate`, the terminal chat and the server (TGI and OpenAI
routes alike) hand to the engine; temperature 0 means greedy everywhere. The server maps TGI's
`do_sample` onto that at its edge. `sample_next` applies the repetition penalty, then either takes
the argmax or warps (temperature, top-k, top-p, typical-p) and draws.

Each request carries its own `torch.Generator`, so a seeded request samples the same tokens
whatever else runs in the process (no global RNG state).

Every finite value the parameter checks accept is safe here: a temperature, top_p or penalty that
float32 rounds to 0 or to inf (1e-300, 1e-308) never produces inf - inf or 0 / 0, and every filter
keeps at least the most likely token, so the probabilities handed to `torch.multinomial` are
always a distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from quantpress.errors import ConfigError


def check_finite(**values: float) -> None:
    """ConfigError naming the first value that is NaN or infinite (they pass `x > 0` style checks
    only by accident: nan > 0 is False, inf > 0 is True)."""
    for name, value in values.items():
        try:
            finite = math.isfinite(value)
        except (TypeError, OverflowError):  # not a number, or an int too large for a float
            finite = False
        if not finite:
            raise ConfigError(f"{name} must be a finite number, got {value!r}")


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed (so does TGI)


@dataclass(frozen=True)
class SamplingParams:
    # The first six fields keep their order: callers construct this positionally.
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy (argmax after the repetition penalty)
    top_p: float = 1.0  # nucleus mass kept; 1.0 disables
    top_k: int = 0  # 0 disables
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + generated ids; 1.0 disables
    seed: int | None = None  # None: the engine draws one (Stream.seed)
    typical_p: float = 1.0  # locally typical mass kept; 1.0 disables
    stop: tuple[str, ...] = ()  # stop strings: generation ends once the generated text contains one

    def __post_init__(self) -> None:
        # The server validates with TGI's and OpenAI's messages first; these guard direct callers.
        object.__setattr__(self, "stop", tuple(self.stop))
        check_finite(temperature=self.temperature, top_p=self.top_p, typical_p=self.typical_p,
                     repetition_penalty=self.repetition_penalty)
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be in [0, 2**64), got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def with_stops(params: SamplingParams, stops: Sequence[str]) -> SamplingParams:
    """`params` that also stop at `stops` (a prompt format's, e.g. "USER:"), which come first: how
    the terminal chat and the server's chat route add the format's stop strings to the caller's."""
    return replace(params, stop=tuple(dict.fromkeys(s for s in [*stops, *params.stop] if s)))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones.

    Computed in float64 (a penalty of 1e-308 is 0 in float32, and 0 * inf is NaN) and clamped to
    the finite range of `logits`' dtype, so the result is finite for every penalty > 0.
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen).double()
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    finite = torch.finfo(logits.dtype)
    return logits.scatter(-1, seen, picked.clamp(finite.min, finite.max).to(logits.dtype))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """`logits` / temperature, shifted so the largest is 0 (softmax is unchanged by the shift).

    After the shift every logit is <= 0, so a tiny temperature sends the others towards -inf and
    leaves the best at exactly 0 (greedy in the limit) instead of computing inf - inf. The divisor
    is clamped to the dtype's positive normal range, where 1e-300 (0 in float32) and 1e300 (inf)
    give the same result as the exact value would.
    """
    if temperature == 1.0:
        return logits
    finite = torch.finfo(logits.dtype)
    shifted = logits - logits.max(-1, keepdim=True).values
    return shifted / min(max(temperature, finite.tiny), finite.max)


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
    drop[..., 0] = False  # the most likely token always stays (p may round to 0 in float32)
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
    logits = apply_temperature(logits, temperature)
    return typical_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), typical_p)


def sample_next(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Choose the next token from 1-D `logits` [vocab] given the token ids `seen` so far (an empty
    tensor is enough when there is no repetition penalty)."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = warp(logits, params.temperature, params.top_k, params.top_p, params.typical_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
