"""Merging a PEFT LoRA adapter into its base model: the first step of the Guanaco recipe.

    merged = merge_lora(Path("llama-7b"), Path("guanaco-7b-adapter"), Path("work/guanaco-7b-merged"))
    # then quantize `merged` like any full-precision folder

The merged folder is a plain Hugging Face checkpoint (safetensors, config.json, tokenizer and
generation files copied from the base) with the same tensor names, dtypes and tying as the base,
plus `merge_lora.json` recording what went in. It is staged in `<out>.partial/` and renamed into
place when complete (staging.py), so `out_dir` is either absent or whole; a re-run whose inputs
did not change (same fingerprint) returns it untouched, which keeps a release re-run from merging
again. `out_dir` may not be or overlap the base or adapter folder, and an existing one is only
ever replaced when it is an earlier merge (it holds `merge_lora.json`) or empty.

peft is an optional dependency (`pip install "quantpress[lora]"`), imported only here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantpress.errors import CheckpointError, ConfigError, NonFiniteError
from quantpress.formats.hf_folder import (
    INDEX_NAME,
    MAX_SHARD_BYTES,
    SHARD_RE,
    TOKENIZER_FILES,
    ModelFolder,
    TensorEntry,
    atomic_write_json,
    copy_side_files,
    read_json,
    write_sharded,
)
from quantpress.outputs import check_disjoint, check_replaceable, check_writable
from quantpress.staging import Staging

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names; old adapters (Guanaco) ship .bin
RECORD_NAME = "merge_lora.json"
RECORD_VERSION = 1  # bump when the merge itself changes, so old merged folders are redone
# What a merge writes (write_sharded's shards, the base's side files, the record): the only files
# replacing an earlier merge may remove.
_MERGE_FILES = {RECORD_NAME, "config.json", INDEX_NAME, *TOKENIZER_FILES}

# peft saves adapter tensors as `base_model.model.<module>.<lora tensor>` (adapter name dropped).
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                          r"(?:\.weight)?$")


def merge_lora(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into the full-precision model in `base_dir` and
    save the result as a Hugging Face folder at `out_dir`, which is returned.

    Raises ConfigError (peft missing, not a LoRA adapter, targets not in the base, adapter touching
    tied embeddings, quantized base), CheckpointError (adapter files missing, tensors that do not
    fit the base) or OutputExistsError (`out_dir` holds something that is not a merge)."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _check_output(out_dir, base_dir, adapter_dir)
    adapter_config = _read_adapter_config(adapter_dir)
    weights_file = _adapter_weights_file(adapter_dir)
    adapter_shapes = _adapter_shapes(weights_file)  # a corrupt adapter fails before the base is loaded
    base = ModelFolder(base_dir)  # validates config.json, every weight header, and refuses folder code
    _check_full_precision(base)
    fingerprint = _fingerprint(base, adapter_config, weights_file)
    if _reusable(out_dir, fingerprint):
        log.info("%s already holds this merge; reusing it", out_dir)
        return out_dir

    peft = _import_peft()
    model = _load_base(base)
    _check_adapter_fits(model, adapter_shapes, adapter_dir.name)
    embeddings = _embedding_types(model)
    peft_model = _apply_adapter(peft, model, base_dir, adapter_dir)
    _check_embeddings_untouched(model, embeddings, adapter_dir.name)
    _check_every_target_has_weights(peft, peft_model, adapter_shapes, adapter_dir.name)
    merged = peft_model.merge_and_unload()
    record = _record(adapter_dir, adapter_config, base_dir, fingerprint)
    _write_staged(out_dir, fingerprint, lambda folder: _save_merged(merged, base, folder, record))
    log.info("merged %s into %s -> %s", adapter_dir.name, base_dir.name, out_dir)
    return out_dir


# --- validating the inputs ---------------------------------------------------------------------

def _check_output(out_dir: Path, base_dir: Path, adapter_dir: Path) -> None:
    """Where the merge goes, before anything is read or loaded: not into its own inputs, over
    nothing but an earlier merge, and somewhere writable."""
    check_disjoint(out_dir, {"base model": base_dir, "adapter folder": adapter_dir})
    staging = Staging(out_dir)
    staging.recover()
    check_replaceable(out_dir, overwrite=True, ours=_not_a_merge, what="merged model")
    staging.check_ours()
    check_writable(staging.path)


def _not_a_merge(folder: Path) -> str | None:
    """None when `folder` may be replaced by a merge: it is empty, or an earlier merge (its record)
    holding nothing but what a merge writes. Else why not."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return None
    if RECORD_NAME not in names:
        return f"{RECORD_NAME} missing"
    foreign = [n for n in names if n not in _MERGE_FILES and not SHARD_RE.fullmatch(n)]
    return f"it holds files a merge does not write: {', '.join(foreign[:5])}" if foreign else None


def _read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter folder not found: {adapter_dir}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}; it is not a PEFT adapter folder")
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConfigError(f"{adapter_dir.name} is a {peft_type or 'untyped'} adapter; only LORA adapters can be merged")
    return config


def _adapter_weights_file(adapter_dir: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise CheckpointError(f"{adapter_dir} has no adapter weights (expected {' or '.join(ADAPTER_WEIGHTS)})")


def _check_full_precision(base: ModelFolder) -> None:
    # LoRA deltas are added to float weights; a GPTQ base has packed integers instead.
    if "quantization_config" in base.config or (base.path / "quantize_config.json").exists():
        raise ConfigError(f"{base.path.name} is a quantized model; merge the adapter into the full-precision base")


def _adapter_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the adapter file, without keeping the tensors."""
    if weights_file.suffix == ".safetensors":
        try:
            with safe_open(str(weights_file), framework="pt") as f:
                return {name: tuple(f.get_slice(name).get_shape()) for name in list(f.keys())}
        except SafetensorError as e:
            raise CheckpointError(f"{weights_file} is not a valid safetensors file: {e}") from None
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # what torch raises for a bad file
        raise CheckpointError(f"{weights_file} cannot be read as a torch state dict: {e}") from None
    return {name: tuple(t.shape) for name, t in state.items()}


def _adapter_modules(adapter_shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Base-model module names the adapter holds LoRA weights for."""
    return {m["module"] for key in adapter_shapes if (m := _ADAPTER_KEY.match(key))}


def _check_adapter_fits(model: nn.Module, adapter_shapes: dict[str, tuple[int, ...]], adapter: str) -> None:
    """Name the first adapter tensor that has no module or the wrong size in the base. peft would
    otherwise ignore weights for missing modules silently, or fail with a long state-dict dump."""
    for key, shape in adapter_shapes.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            continue
        name, part = match["module"], match["part"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"adapter {adapter} has weights for {name}, which the base model does not have "
                                  "(adapter made for a model with more layers or other module names?)") from None
        if not isinstance(module, nn.Linear) or part not in ("lora_A", "lora_B"):
            continue  # embeddings and other layer kinds: peft's own checks apply
        # lora_A is (r, in_features) and lora_B is (out_features, r) for an nn.Linear
        axis, expected, what = ((1, module.in_features, "input") if part == "lora_A"
                                else (0, module.out_features, "output"))
        if len(shape) != 2 or shape[axis] != expected:
            raise CheckpointError(
                f"adapter {adapter} does not fit the base model: {key} has shape {list(shape)} but {name} has "
                f"{expected} {what} features (adapter made for a model with another hidden size?)")


def _embedding_types(model: nn.Module) -> tuple[type, type]:
    return type(model.get_input_embeddings()), type(model.get_output_embeddings())


def _check_embeddings_untouched(model: nn.Module, before: tuple[type, type], adapter: str) -> None:
    """A tied lm_head and embed_tokens share one tensor: merging a delta meant for one of them
    changes both, and the result can be written neither as tied nor correctly untied. peft
    replaces a module it adapts with a wrapper, so a changed type means the adapter touches it."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    if _embedding_types(model) != before:
        raise ConfigError(f"adapter {adapter} changes the input or output embeddings of a model whose embeddings "
                          "are tied (tie_word_embeddings); such an adapter cannot be merged into one tied matrix")


def _check_every_target_has_weights(peft, peft_model: nn.Module, adapter_shapes: dict[str, tuple[int, ...]],
                                    adapter: str) -> None:
    """peft adds LoRA to every module target_modules matches; one the file has no weights for would
    merge as a no-op. That happens when the adapter was trained on a model with fewer layers."""
    prefix = "base_model.model."
    wrapped = {name.removeprefix(prefix) for name, module in peft_model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    without = sorted(wrapped - _adapter_modules(adapter_shapes))
    if without:
        raise CheckpointError(f"adapter {adapter} targets {without[:3]} in the base model but holds no weights for "
                              f"{'them' if len(without) > 1 else 'it'} (adapter made for a smaller model?)")


# --- loading and merging -----------------------------------------------------------------------

def _import_peft():
    try:
        import peft
        import peft.tuners.lora
    except ImportError:
        raise ConfigError('merging a LoRA adapter needs peft: pip install "quantpress[lora]"') from None
    return peft


def _checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint was saved in (transformers 5 writes `dtype`, older `torch_dtype`)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"config.json names dtype {name!r}, which is not a floating-point torch dtype")
    return dtype


def _load_base(base: ModelFolder) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=_checkpoint_dtype(base.config),
                                                 trust_remote_code=False, local_files_only=True)
    model.eval()
    return model


def _apply_adapter(peft, model: nn.Module, base_dir: Path, adapter_dir: Path) -> nn.Module:
    try:
        return peft.PeftModel.from_pretrained(model, adapter_dir)
    except ValueError as e:  # peft's NoMatchingPeftModuleError: target_modules match nothing
        raise ConfigError(f"cannot apply adapter {adapter_dir.name} to {base_dir.name}: {e}") from None
    except RuntimeError as e:  # load_state_dict's size mismatch, for layer kinds _check_adapter_fits skips
        if "size mismatch" not in str(e):
            raise
        first = next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise CheckpointError(f"adapter {adapter_dir.name} does not fit {base_dir.name}: {first}") from None


# --- writing -----------------------------------------------------------------------------------

def _save_merged(model: nn.Module, base: ModelFolder, folder: Path, record: dict) -> None:
    """Write the merged weights under the base's tensor names, the base's config and side files,
    then the record (last, so a folder with a record is complete)."""
    state = model.state_dict()
    names = base.names()
    missing = [name for name in names if name not in state]
    if missing:
        raise CheckpointError(f"the merged model has no tensors {missing[:5]} that {base.path.name} holds")
    _check_extra_tensors_are_tied(state, names, base.path.name)
    for name in names:
        if state[name].is_floating_point() and not torch.isfinite(state[name]).all():
            raise NonFiniteError(f"merged tensor {name} contains NaN or Inf; the adapter is broken")
    entries = [TensorEntry.of_tensor(name, state[name]) for name in names]
    write_sharded(folder, entries, lambda name: state[name], MAX_SHARD_BYTES, {"format": "pt"})
    # The base's own config.json (not transformers' re-serialisation of it) keeps every field as the
    # base had it, tie_word_embeddings included.
    config = {k: v for k, v in base.config.items() if k != "quantization_config"}
    atomic_write_json(folder / "config.json", config)
    copy_side_files(base.path, folder)
    atomic_write_json(folder / RECORD_NAME, record)


def _check_extra_tensors_are_tied(state: dict[str, torch.Tensor], names: list[str], base: str) -> None:
    """The model's state dict lists a tied lm_head.weight the base file leaves out; anything else
    extra would be a tensor the merged folder silently drops."""
    kept = set(names)
    written = {state[name].data_ptr() for name in names}
    extra = [name for name in state if name not in kept and state[name].data_ptr() not in written]
    if extra:
        raise CheckpointError(f"the merged model has tensors {extra[:5]} that {base} does not hold")


def _write_staged(out_dir: Path, fingerprint: str, write) -> None:
    """Build the folder in staging and publish it (staging.py): `out_dir` is never seen
    half-written, and a run killed while publishing is finished by the next one."""
    staging = Staging(out_dir)
    staging.open({"merge_lora": fingerprint})
    try:
        if not staging.assembled:
            write(staging.begin_final())
        staging.publish()
    except BaseException:
        staging.discard()
        raise


# --- reuse -------------------------------------------------------------------------------------

def _fingerprint(base: ModelFolder, adapter_config: dict, weights_file: Path) -> str:
    """What the merge depends on: the adapter's config and exact weights (hashed: adapters are
    small), and the base's files by name, size and mtime (hashing gigabytes of base weights on
    every release re-run would cost more than the check saves)."""
    side_files = [base.path / name for name in ("config.json", *TOKENIZER_FILES) if (base.path / name).is_file()]
    inputs = {
        "version": RECORD_VERSION,
        "adapter_config": adapter_config,
        "adapter_weights": {weights_file.name: _sha256(weights_file)},
        "base_files": base.weight_stamps() + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in side_files],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reusable(out_dir: Path, fingerprint: str) -> bool:
    """True when `out_dir` is a finished merge of the same inputs (checked as ours up front)."""
    record_path = out_dir / RECORD_NAME
    if not record_path.is_file():
        return False
    try:
        recorded = read_json(record_path).get("fingerprint")
        ModelFolder(out_dir)  # a merge someone damaged since is redone, not reused
    except CheckpointError:
        return False
    return recorded == fingerprint


def _record(adapter_dir: Path, adapter_config: dict, base_dir: Path, fingerprint: str) -> dict:
    """merge_lora.json: published with the release, so folder names only, never local paths."""
    targets = adapter_config.get("target_modules")
    return {
        "adapter": adapter_dir.name,
        "base": base_dir.name,
        "base_model_name_or_path": _public_name(adapter_config.get("base_model_name_or_path")),
        "r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,  # a regex string stays as is
        "fingerprint": fingerprint,
    }


def _public_name(name: str | None) -> str | None:
    """A hub id stays as is; an adapter trained from a local folder records that folder's name only."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return path.name if path.is_absolute() or name.startswith(("~", ".")) else name
