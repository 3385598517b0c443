"""A release recipe: the model's metadata plus the list of variants to publish, read from YAML.

    model:                       # everything the card says about the model
      name: Tiny Llama
      creator: quantpress
      original_model: quantpress/tiny-llama
      license: apache-2.0
      prompt_template: vicuna    # a name from quantpress.prompts.TEMPLATES
    defaults:                    # applied to every variant, each variant may override
      act_order: true
      damp_percent: 0.1
      dataset: wikitext2
    variants:
      - {main: true, bits: 4, group_size: -1, desc: "..."}
      - {bits: 4, group_size: 128, desc: "..."}

A variant's branch is derived from its QuantConfig (`config.variant_name`), or is `main` for the
recommended one; an explicit `branch:` is allowed for variants the derived name cannot tell apart
(the same quant settings calibrated on two datasets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from quantpress.config import CalibrationConfig, QuantConfig, variant_name
from quantpress.errors import ConfigError
from quantpress.prompts import prompt_template

BRANCH_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # what text-generation-webui accepts after `repo:`
_QUANT_KEYS = {f.name for f in fields(QuantConfig)}
_CALIBRATION_KEYS = {f.name for f in fields(CalibrationConfig)}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    creator: str
    original_model: str  # the base model's repo id or URL: card `base_model`
    license: str = "other"
    quantized_by: str = "quantpress"
    prompt_template: str = "none"
    system_prompt: str | None = None  # None: the template's default
    description: str = ""
    repo_id: str | None = None  # where the release will live, e.g. "org/Model-GPTQ" (card usage text)

    def __post_init__(self) -> None:
        prompt_template(self.prompt_template)  # fail at load time on an unknown name


@dataclass(frozen=True)
class Variant:
    quant: QuantConfig
    calibration: CalibrationConfig
    description: str = ""
    main: bool = False  # the recommended variant: published on `main`
    branch_override: str | None = None

    @property
    def branch(self) -> str:
        if self.branch_override is not None:
            return self.branch_override
        return "main" if self.main else variant_name(self.quant)


@dataclass(frozen=True)
class Recipe:
    model: ModelInfo
    variants: tuple[Variant, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("a recipe needs at least one variant")
        if sum(v.branch == "main" for v in self.variants) != 1:
            raise ConfigError("exactly one variant must be published on `main` (set `main: true` on it)")
        branches = [v.branch for v in self.variants]
        for b in branches:
            if not BRANCH_RE.match(b):
                raise ConfigError(f"branch name {b!r} must match {BRANCH_RE.pattern}")
            if branches.count(b) > 1:
                raise ConfigError(f"two variants would both be published on branch {b!r}; give one an explicit `branch:`")

    @property
    def main(self) -> Variant:
        return next(v for v in self.variants if v.branch == "main")


def parse_recipe(data: dict, *, seqlen_default: int) -> Recipe:
    """Build a Recipe from the YAML's dict. `seqlen_default` fills a missing `seqlen` (the
    model's context, capped at 2048)."""
    if not isinstance(data, dict) or "model" not in data or "variants" not in data:
        raise ConfigError("a recipe is a mapping with `model:` and `variants:`")
    try:
        model = ModelInfo(**data["model"])
    except TypeError as e:
        raise ConfigError(f"recipe `model:` {e}") from None
    defaults = dict(data.get("defaults") or {})
    variants = tuple(_variant(i, {**defaults, **spec}, seqlen_default) for i, spec in enumerate(data["variants"]))
    return Recipe(model, variants)


def _variant(index: int, spec: dict, seqlen_default: int) -> Variant:
    spec = dict(spec)
    description = str(spec.pop("desc", spec.pop("description", "")))
    main = bool(spec.pop("main", False))
    branch = spec.pop("branch", None)
    quant = {k: spec.pop(k) for k in list(spec) if k in _QUANT_KEYS}
    calibration = {k: spec.pop(k) for k in list(spec) if k in _CALIBRATION_KEYS}
    if spec:
        raise ConfigError(f"variant {index}: unknown keys {sorted(spec)}")
    calibration.setdefault("seqlen", seqlen_default)
    return Variant(QuantConfig(**quant), CalibrationConfig(**calibration), description, main, branch)


def load_recipe(path: str | Path, *, seqlen_default: int) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, seqlen_default=seqlen_default)


def default_recipe(model: ModelInfo, *, seqlen: int) -> Recipe:
    """TheBloke's familiar set: all act-order, damp 0.1, wikitext2 calibration."""
    rows = [
        (4, -1, True, "4-bit, with Act Order. No group size, to lower VRAM requirements."),
        (4, 128, False, ("4-bit, with Act Order and group size 128g. Uses even less VRAM than 64g, "
                         "but with slightly lower accuracy.")),
        (4, 32, False, ("4-bit, with Act Order and group size 32g. Gives highest possible inference "
                        "quality, with maximum VRAM usage.")),
        (3, 128, False, "3-bit, with group size 128g and act-order. Higher quality than 128g-False."),
        (3, 32, False, "3-bit, with group size 32g and act-order. Highest quality 3-bit option."),
        (8, -1, False, "8-bit, with Act Order. No group size, to lower VRAM requirements."),
        (8, 128, False, ("8-bit, with group size 128g for higher inference quality and with Act Order "
                         "for even higher accuracy.")),
    ]
    calibration = CalibrationConfig(dataset="wikitext2", seqlen=seqlen)
    variants = tuple(
        Variant(QuantConfig(bits=bits, group_size=gs, act_order=True, damp_percent=0.1), calibration, desc, main)
        for bits, gs, main, desc in rows
    )
    return Recipe(model, variants)
