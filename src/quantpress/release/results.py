"""What a release measured: the typed records the card is rendered from, stored as JSON.

Every number in a model card comes from one of these records, which the release writes after
measuring; nothing in a card is typed in by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quantpress.config import CalibrationConfig, QuantConfig
from quantpress.formats.hf_folder import atomic_write_json


@dataclass(frozen=True)
class Baseline:
    """The full-precision model the variants are compared with."""

    perplexity: float
    eval_dataset: str  # e.g. "wikitext2"
    eval_seqlen: int
    eval_windows: int
    size_bytes: int  # the source's *.safetensors
    linear_shapes: dict[str, tuple[int, int]]  # quantized module name in layer 0 -> (out, in) features


@dataclass(frozen=True)
class VariantResult:
    branch: str
    quant: QuantConfig
    calibration: CalibrationConfig
    description: str
    hessian_inputs: str  # "quantized" (strict sequential GPTQ) or "full_precision" (shared calibration)
    size_bytes: int  # *.safetensors on the branch
    perplexity: float  # same eval_dataset / eval_seqlen / eval_windows as the Baseline
    quantize_seconds: float
    eval_seconds: float
    fingerprint: str  # sha256 of everything the variant depends on; a mismatch means redo it
    # agreement with the full-precision model on the eval text in its chat format (api.compare);
    # None in records written before it was measured
    kl_divergence: float | None = None
    top1: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["quant"]["method"] = self.quant.method.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> VariantResult:
        return cls(**{**d, "quant": QuantConfig(**d["quant"]), "calibration": CalibrationConfig(**d["calibration"])})


def write_result(path: Path, result: VariantResult) -> None:
    atomic_write_json(path, result.to_json())


def read_result(path: Path) -> VariantResult | None:
    """The stored result, or None when absent or unreadable (then the variant is redone)."""
    try:
        return VariantResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
