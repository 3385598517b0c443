"""A release recipe: the model's metadata plus the list of variants to publish, read from YAML.

    model:                       # everything the card says about the model
      name: Tiny Llama
      creator: quantpress
      original_model: quantpress/tiny-llama
      license: apache-2.0
      prompt_template: vicuna    # a name from quantpress.prompts.TEMPLATES
    defaults:                    # applied to every variant, each variant may override; settings
      dataset: wikitext2         # left open take the recommended levers (config.recommended)
      damp_search: false         # e.g. one global damp instead of a search per module
      damp_percent: 0.1
    variants:
      - {main: true, bits: 4, group_size: -1, desc: "..."}
      - {bits: 4, group_size: 128, desc: "..."}

A variant's branch is derived from its QuantConfig (`config.variant_name`), or is `main` for the
recommended one; an explicit `branch:` is allowed for variants the derived name cannot tell apart
(the same quant settings calibrated on two datasets).

The YAML is checked against the typed objects it becomes before anything runs. Each key's type
comes from the dataclass field it fills (ModelInfo, QuantConfig, CalibrationConfig, Variant),
and the check is strict: a bool must be a YAML bool (`"false"` is a string, and a non-empty
string would otherwise read as true), an int a YAML int (not `4.0`, `"4"` or `true`). Every
message names the file and the key: `recipe.yaml: variants[2].group_size: expected an integer,
got 'abc'`.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path

import yaml

from quantpress.config import CalibrationConfig, QuantConfig, recommended, variant_name
from quantpress.errors import ConfigError
from quantpress.prompts import prompt_template
from quantpress.release.git import check_branch_name


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
            raise ConfigError("variants: a recipe needs at least one variant")
        if sum(v.branch == "main" for v in self.variants) != 1:
            raise ConfigError("variants: exactly one variant must be published on `main` (set `main: true` on it)")
        first: dict[str, int] = {}
        for i, v in enumerate(self.variants):
            try:
                check_branch_name(v.branch)  # here, not after hours of quantizing and evaluating
            except ConfigError as e:
                raise ConfigError(f"variants[{i}].branch: {e}") from None
            if v.branch in first:
                raise ConfigError(f"variants[{first[v.branch]}] and variants[{i}] would both be published on branch "
                                  f"{v.branch!r}; give one an explicit `branch:`")
            first[v.branch] = i

    @property
    def main(self) -> Variant:
        return next(v for v in self.variants if v.branch == "main")


def load_recipe(path: str | Path, *, seqlen_default: int) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, seqlen_default=seqlen_default, source=str(path))


def parse_recipe(data: object, *, seqlen_default: int, source: str = "recipe") -> Recipe:
    """Build a Recipe from the YAML's data; every error is a ConfigError that starts with `source`
    (the file) and the key. `seqlen_default` fills a missing `seqlen` (the model's context, capped
    at 2048)."""
    try:
        return _recipe(data, seqlen_default)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# --- the schema: YAML key -> the type of the dataclass field it fills ---------------------------

def _field_types(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _required(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING]


_TOP_KEYS = ("model", "defaults", "variants")
_QUANT = _field_types(QuantConfig)
_CALIBRATION = _field_types(CalibrationConfig)
_SETTINGS = {**_QUANT, **_CALIBRATION}  # what `defaults:` may set
# A variant's own keys, by the Variant field each fills (`desc` is TheBloke's spelling).
_VARIANT_FIELDS = {"main": "main", "branch": "branch_override", "desc": "description", "description": "description"}
_VARIANT_KEYS = {**_SETTINGS, **{key: _field_types(Variant)[name] for key, name in _VARIANT_FIELDS.items()}}


def _recipe(data: object, seqlen_default: int) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe is a mapping with `model:` and `variants:`, got {_shown(data)}")
    _check_keys(data, _TOP_KEYS, "")
    for key in ("model", "variants"):
        if key not in data:
            raise ConfigError(f"{key}: missing (a recipe is a mapping with `model:` and `variants:`)")
    model = _build(ModelInfo, _typed_mapping(data["model"], _field_types(ModelInfo), "model"), "model")
    defaults = {} if data.get("defaults") is None else _typed_mapping(data["defaults"], _SETTINGS, "defaults")
    if not isinstance(data["variants"], list):
        raise ConfigError(f"variants: expected a list of variants, got {_shown(data['variants'])}")
    variants = tuple(_variant(spec, defaults, seqlen_default, f"variants[{i}]")
                     for i, spec in enumerate(data["variants"]))
    return Recipe(model, variants)


def _variant(spec: object, defaults: dict, seqlen_default: int, where: str) -> Variant:
    own = _typed_mapping(spec, _VARIANT_KEYS, where)
    if "desc" in own and "description" in own:
        raise ConfigError(f"{where}: give `desc` or `description`, not both")
    values = {"seqlen": seqlen_default, **defaults, **own}
    # settings the recipe leaves open take the recommended levers, as `quantpress quantize` does
    quant = _build(QuantConfig, {k: v for k, v in values.items() if k in _QUANT}, where, make=recommended)
    calibration = _build(CalibrationConfig, {k: v for k, v in values.items() if k in _CALIBRATION}, where)
    variant = {_VARIANT_FIELDS[k]: v for k, v in own.items() if k in _VARIANT_FIELDS}
    return Variant(quant, calibration, **variant)


def _build(cls: type, values: dict, where: str, make=None):
    """`cls(**values)` (or `make(**values)`) for values already type-checked; its own range checks
    get the key path."""
    missing = [name for name in _required(cls) if name not in values]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    try:
        return (make or cls)(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_keys(mapping: dict, known: typing.Collection[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{_at(where, key)}: unknown key{hint}")


def _typed_mapping(value: object, schema: dict[str, object], where: str) -> dict:
    """The mapping `value` with every key known to `schema` and every value of its key's type."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
    _check_keys(value, schema, where)
    return {key: _typed(v, schema[key], _at(where, key)) for key, v in value.items()}


def _typed(value: object, hint: object, where: str) -> object:
    """`value` as type `hint` (a field's type: bool, int, float, str, an Enum, or `X | None`),
    strictly: YAML already tells bools, ints and strings apart, so nothing is converted from text.
    An int is a valid float (`damp_percent: 0` is 0.0); a bool is never a number."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if isinstance(option, type) and issubclass(option, Enum) and isinstance(value, str):
            if value in {m.value for m in option}:
                return option(value)
    raise ConfigError(f"{where}: expected {' or '.join(_expected(o) for o in options)}, got {_shown(value)}")


def _expected(option: object) -> str:
    if isinstance(option, type) and issubclass(option, Enum):
        return "one of " + ", ".join(repr(m.value) for m in option)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}[option]


def _shown(value: object) -> str:
    """A value as the YAML that gave it: `"false"` quoted, `false` not."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) <= 40 else "a list"
    return repr(value)


def _at(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def default_recipe(model: ModelInfo, *, seqlen: int) -> Recipe:
    """TheBloke's familiar set of branches (all act-order, wikitext2 calibration), each with the
    recommended levers: act-order with static groups, weighted range search, damp per module."""
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
        Variant(recommended(bits=bits, group_size=gs), calibration, desc, main)
        for bits, gs, main, desc in rows
    )
    return Recipe(model, variants)
