"""Per-module precision: the few modules that carry most of the error are stored at 8 bits.

On real models the error is anything but uniform: on SmolLM2-135M at 4-bit g128 the
`mlp.down_proj` of layers 28, 29 and 11 (massive activations) carry 77% of GPTQ's summed loss,
while the three of them hold 1.5% of the quantized weights. With `QuantConfig.upgrade_budget`,
every module is also solved at UPGRADE_BITS, both output errors are measured on the calibration
data, and after the last layer the modules whose error drops most per extra byte are upgraded
until the budget (a fraction of the quantized Linear bytes) is spent.

The choice is written as GPTQModel's per-module `dynamic` overrides (`"+:^name$": {"bits": 8}`),
which GPTQModel and vLLM read (gptq_utils.get_dynamic_override); loaders that ignore `dynamic`
(AutoGPTQ, ExLlama, TGI) would decode those modules at the base bit width, so the card says so.

Later layers were calibrated on the outputs of the base-bit modules (the choice is made when all
errors are known): an upgraded module only brings its layer's output closer to full precision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

UPGRADE_BITS = 8


@dataclass(frozen=True)
class Candidate:
    name: str  # full module name, "model.layers.28.mlp.down_proj"
    error: float  # output error at the base bit width, tr((W - Q) H (W - Q)^T)
    upgrade_error: float  # the same at UPGRADE_BITS
    base_bytes: int  # packed qweight + qzeros + scales at the base bit width
    extra_bytes: int  # what storing it at UPGRADE_BITS adds


def choose_upgrades(candidates: Iterable[Candidate], budget: float) -> list[str]:
    """The modules to store at UPGRADE_BITS: the largest error reduction per extra byte first,
    while the extra bytes stay within `budget` x the base bytes of all modules. Sorted by name."""
    candidates = list(candidates)
    allowance = budget * sum(c.base_bytes for c in candidates)
    ranked = sorted(candidates, key=lambda c: ((c.error - c.upgrade_error) / max(c.extra_bytes, 1), c.name),
                    reverse=True)
    chosen, spent = [], 0
    for c in ranked:
        if c.error <= c.upgrade_error or spent + c.extra_bytes > allowance:
            continue
        chosen.append(c.name)
        spent += c.extra_bytes
    return sorted(chosen)


def dynamic_overrides(names: Iterable[str]) -> dict[str, dict[str, int]]:
    """GPTQModel's `dynamic` form: one anchored, escaped pattern per upgraded module."""
    return {f"+:^{re.escape(name)}$": {"bits": UPGRADE_BITS} for name in sorted(names)}
