"""quantize_config.json / config.json["quantization_config"]: write ours, read everyone's (spec A6).

Writing: one dict, written to both files, with every field a loader might default spelled out
(TF defaults group_size to 128, TGI defaults sym to False: spec D2). AutoGPTQ's keys come first
in its order, then the keys newer readers look for (`format`, `lm_head`, `pack_dtype`), then
GPTQModel-style `meta`.

Reading: AutoGPTQ, GPTQModel (v1.9 and HEAD) and transformers/optimum spell the same settings
differently (key drift, spec D8). Each source dict is first normalised to canonical keys, then
config.json's `quantization_config` wins over quantize_config.json key by key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from quantpress.config import SUPPORTED_BITS, CalibrationConfig, ChatConfig, QuantConfig
from quantpress.errors import CheckpointError
from quantpress.formats.gptq_tensors import CheckpointFormat

# Datasets transformers' GPTQConfig accepts as a string: any other string makes
# `GPTQConfig.from_dict` raise, i.e. transformers could not even load the model.
_TF_DATASET_NAMES = ("wikitext2", "c4", "c4-new")
# Repacked layouts with the same quant_method but different tensors (spec A8).
_REPACKED_FORMATS = ("marlin", "bitblas")
_TF_DEFAULT_GROUP_SIZE = 128  # transformers' GPTQConfig default when the key is missing


@dataclass(frozen=True)
class GPTQFormatInfo:
    """What a loader needs to rebuild and decode the quantized Linears of a GPTQ checkpoint."""

    bits: int
    group_size: int  # -1: one group over all input features
    desc_act: bool
    sym: bool
    checkpoint_format: CheckpointFormat
    lm_head: bool = False
    modules_in_block_to_quantize: list[list[str]] | None = None
    # GPTQModel's per-module overrides: "+:regex" -> {"bits", "group_size"}, "-:regex" -> not
    # quantized; the first matching pattern wins (GPTQModel dynamic_get, vLLM get_dynamic_override)
    dynamic: dict[str, dict[str, int]] | None = None

    def module_settings(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of the quantized module `name` ("model.layers.3.mlp.down_proj")."""
        for pattern, overrides in (self.dynamic or {}).items():
            if pattern.startswith("-:"):
                if re.match(pattern.removeprefix("-:"), name):
                    raise CheckpointError(f"{name} holds GPTQ tensors but `dynamic` excludes it ({pattern})")
            elif re.match(pattern.removeprefix("+:"), name):
                return overrides.get("bits", self.bits), overrides.get("group_size", self.group_size)
        return self.bits, self.group_size


def quantize_config_dict(
    quant: QuantConfig,
    calibration: CalibrationConfig | None,
    fmt: CheckpointFormat,
    *,
    tool_version: str,
    model_name_or_path: str | None = None,
    hessian_inputs: str | None = "quantized",
    chat: ChatConfig = ChatConfig(),
    dynamic: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The dict written as quantize_config.json and as config.json["quantization_config"].

    `calibration` is None for methods without calibration data (RTN): dataset, nsamples,
    seqlen and calibration_seed are then null. All values are plain JSON types.
    """
    fmt = CheckpointFormat(fmt)
    dataset = None if calibration is None else PurePath(calibration.dataset).name
    config = {
        # AutoGPTQ BaseQuantizeConfig.to_dict() keys, in its order
        "bits": int(quant.bits),
        "group_size": int(quant.group_size),
        "damp_percent": float(quant.damp_percent),
        "desc_act": quant.desc_act,  # act-order with static groups needs none at load time
        "static_groups": bool(quant.static_groups),
        "sym": bool(quant.sym),
        "true_sequential": bool(quant.true_sequential),
        "model_name_or_path": model_name_or_path,
        "model_file_base_name": "model",
        # loaders dispatch on "gptq"; whether GPTQ or RTN produced the weights is under meta
        "quant_method": "gptq",
        "checkpoint_format": fmt.value,
        # newest optimum reads `format`, transformers/vLLM/ExLlama `checkpoint_format`: write both
        "format": fmt.value,
        "lm_head": False,
        "pack_dtype": "int32",
        # transformers rejects any dataset string outside its own list (see _TF_DATASET_NAMES),
        # so other names only go under meta
        "dataset": dataset if dataset in _TF_DATASET_NAMES else None,
        "nsamples": None if calibration is None else int(calibration.nsamples),
        "seqlen": None if calibration is None else int(calibration.seqlen),
        "meta": {
            "quantizer": [f"quantpress:{tool_version}"],
            "damp_percent": float(quant.damp_percent),
            "static_groups": bool(quant.static_groups),
            "true_sequential": bool(quant.true_sequential),
            "mse": bool(quant.mse),
            "mse_weighted": bool(quant.mse_weighted),
            "upgrade_budget": float(quant.upgrade_budget),
            "group_aware": bool(quant.group_aware),
            "damp_search": bool(quant.damp_search),
            # act-order as quantized (desc_act above says what loaders must apply: none when static)
            "act_order": bool(quant.act_order),
            "method": quant.method.value,
            "signround_iters": int(quant.signround_iters) if quant.method.value == "signround" else None,
            "signround_lr": float(quant.signround_lr) if quant.method.value == "signround" else None,
            "signround_target": quant.signround_target if quant.method.value == "signround" else None,
            # only the file name of a local text file: never publish a local path
            "dataset": dataset,
            "calibration_seed": None if calibration is None else int(calibration.seed),
            "calibration_dtype": None if calibration is None else calibration.compute_dtype,
            # "quantized": sequential GPTQ, each layer's Hessians from the quantized layers before it;
            # "full_precision": one shared calibration pass over the unquantized model (quantize_shared)
            "hessian_inputs": None if calibration is None else hessian_inputs,
            # the prompt format (quantpress.prompts) chat/serve use when no --template is given
            "prompt_template": chat.template,
            "system_prompt": chat.system_prompt,
        },
    }
    if dynamic:
        # GPTQModel's per-module overrides, read by GPTQModel and vLLM (mixed_precision.py); only
        # written when used, as GPTQModel does, so every other loader sees the plain config
        config = {"bits": config["bits"], "dynamic": dynamic, **config}
    return config


def read_format_info(config: dict, quantize_config: dict | None) -> GPTQFormatInfo:
    """Parse the GPTQ settings of a checkpoint from config.json and/or quantize_config.json.

    `config` is the whole config.json; its "quantization_config" takes precedence key by key over
    `quantize_config` (the quantize_config.json contents, or None), as in vLLM and TGI. Missing
    keys get the defaults loaders use: checkpoint_format "gptq", sym True, group_size 128,
    desc_act False, lm_head False. Raises CheckpointError for anything quantpress cannot decode
    exactly: another quant_method, a repacked (marlin/bitblas) layout, a pack_dtype other than
    int32, unsupported bits, per-module `dynamic` overrides, a quantized lm_head.
    """
    sources = []
    if config.get("quantization_config") is not None:
        sources.append(("config.json quantization_config", config["quantization_config"]))
    if quantize_config is not None:
        sources.append(("quantize_config.json", quantize_config))
    if not sources:
        raise CheckpointError(
            "no GPTQ settings: config.json has no quantization_config and there is no "
            "quantize_config.json"
        )
    merged: dict[str, Any] = {}
    for label, source in reversed(sources):  # lowest precedence first, so the primary overwrites
        merged.update(_canonical_keys(source, label))

    _check_quant_method(merged.get("quant_method"))
    checkpoint_format = _checkpoint_format(merged.get("checkpoint_format"))
    _check_pack_dtype(merged.get("pack_dtype"))
    lm_head = _bool(merged, "lm_head", False)
    if lm_head:
        raise CheckpointError("a quantized lm_head (lm_head: true) is not supported yet")
    return GPTQFormatInfo(
        bits=_bits(merged),
        group_size=_group_size(merged),
        desc_act=_bool(merged, "desc_act", False),
        sym=_bool(merged, "sym", True),
        checkpoint_format=checkpoint_format,
        lm_head=lm_head,
        modules_in_block_to_quantize=_modules_in_block(merged.get("modules_in_block_to_quantize")),
        dynamic=_dynamic(merged.get("dynamic")),
    )


# ---------------------------------------------------------------------------------------------
# key normalisation

# canonical key -> synonyms other writers use, checked in this order
_SYNONYMS = {
    "bits": ("w_bit",),  # AutoAWQ-style spelling that AutoGPTQ's from_quant_config accepts
    "group_size": ("q_group_size",),
    "quant_method": ("method",),  # GPTQModel HEAD writes both
    "checkpoint_format": ("format",),  # newest optimum writes only `format`
}


def _canonical_keys(source: Any, label: str) -> dict[str, Any]:
    """One source dict with synonyms folded into canonical keys; conflicting synonyms raise."""
    if not isinstance(source, dict):
        raise CheckpointError(f"{label} must be a JSON object, found {type(source).__name__}")
    out = dict(source)
    for key, synonyms in _SYNONYMS.items():
        for synonym in synonyms:
            if synonym not in out:
                continue
            value = out.pop(synonym)
            if key in out and out[key] != value:
                raise CheckpointError(
                    f"{label}: {key!r} is {out[key]!r} but its synonym {synonym!r} is {value!r}; "
                    "loaders would disagree on how to read this checkpoint"
                )
            out[key] = value
    if out.get("is_marlin_format") is True:
        # AutoGPTQ's flag for its repacked Marlin layout (it sets checkpoint_format "marlin")
        raise CheckpointError(
            f"{label}: is_marlin_format is true, i.e. the repacked Marlin layout, which quantpress "
            "cannot read; use the plain GPTQ (gptq/gptq_v2) checkpoint of this model"
        )
    return out


# ---------------------------------------------------------------------------------------------
# field checks


def _check_quant_method(value: Any) -> None:
    if value is None:
        return  # old AutoGPTQ quantize_config.json files predate the key
    method = str(value).lower()
    if method == "gptq":
        return
    if method == "marlin":
        raise CheckpointError(
            "quant_method 'marlin' is the repacked Marlin layout, which quantpress cannot read; "
            "use the plain GPTQ (gptq/gptq_v2) checkpoint of this model"
        )
    raise CheckpointError(
        f"quant_method is {value!r}, not 'gptq': quantpress only reads GPTQ checkpoints"
    )


def _check_pack_dtype(value: Any) -> None:
    if value is None or str(value).removeprefix("torch.") == "int32":
        return
    raise CheckpointError(
        f"pack_dtype {value!r} is not supported: only 'int32' packing is the GPTQ layout other "
        "loaders read"
    )


_DYNAMIC_KEYS = ("bits", "group_size")  # the per-module overrides quantpress can decode


def _dynamic(value: Any) -> dict[str, dict[str, int]] | None:
    """GPTQModel's `dynamic`, checked: valid patterns, and only bits/group_size overrides."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"dynamic must be an object of per-module overrides, found {value!r}")
    for pattern, overrides in value.items():
        try:
            re.compile(str(pattern).removeprefix("+:").removeprefix("-:"))
        except re.error as e:
            raise CheckpointError(f"dynamic pattern {pattern!r} is not a regular expression: {e}") from None
        if not isinstance(overrides, dict) or set(overrides) - set(_DYNAMIC_KEYS):
            raise CheckpointError(f"dynamic override {pattern!r}: {overrides!r}; quantpress decodes per-module "
                                  f"{' and '.join(_DYNAMIC_KEYS)} only")
        _bits({"bits": overrides.get("bits", 4)})
        _group_size({"group_size": overrides.get("group_size", 128)})
    return value


def _bits(merged: dict[str, Any]) -> int:
    if "bits" not in merged:
        raise CheckpointError("the GPTQ config has no 'bits' (nor 'w_bit')")
    bits = merged["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"bits must be one of {SUPPORTED_BITS}, found {bits!r}")
    return bits


def _group_size(merged: dict[str, Any]) -> int:
    group_size = merged.get("group_size", _TF_DEFAULT_GROUP_SIZE)
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size != -1 and group_size <= 0)
    ):
        raise CheckpointError(f"group_size must be -1 or a positive integer, found {group_size!r}")
    return group_size


def _bool(merged: dict[str, Any], key: str, default: bool) -> bool:
    value = merged.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"{key} must be true or false, found {value!r}")
    return value


def _checkpoint_format(value: Any) -> CheckpointFormat:
    if value is None:
        return CheckpointFormat.GPTQ  # AutoGPTQ: a missing checkpoint_format means v1
    name = str(value).lower()
    if name in _REPACKED_FORMATS:
        raise CheckpointError(
            f"checkpoint_format {value!r} is a repacked kernel layout, which quantpress cannot "
            "read; use the plain GPTQ (gptq/gptq_v2) checkpoint of this model"
        )
    try:
        return CheckpointFormat(name)
    except ValueError:
        expected = [f.value for f in CheckpointFormat]
        raise CheckpointError(
            f"unknown checkpoint_format {value!r}; expected one of {expected}"
        ) from None


def _modules_in_block(value: Any) -> list[list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(group, list) and all(isinstance(name, str) for name in group) for group in value
    ):
        raise CheckpointError(
            f"modules_in_block_to_quantize must be a list of lists of module names, found {value!r}"
        )
    return [list(group) for group in value]
