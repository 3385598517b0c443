"""quantize(): a Hugging Face model folder in, a GPTQ folder every loader reads out.

Memory stays at about one decoder layer plus the calibration activations: the model skeleton
lives on `meta`, and each layer's weights are read from safetensors, quantized, staged to disk
and released before the next layer is read.

Outputs are never half-written: work happens in `<out>.partial/` (staging.py), each finished
layer is staged there as its own file (so an interrupted run resumes at the next layer), and the
finished folder is renamed to `<out>` in steps that a killed run resumes from. Every check that
can run before the first forward pass does (`preflight`): a bad path or setting fails in
milliseconds, before any work, and `--overwrite` only ever replaces a folder quantpress wrote.

`quantize_shared` writes several variants from one full-precision calibration pass (the release
factory's `--shared-calibration`); each variant stages and resumes exactly as `quantize` does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from quantpress import __version__
from quantpress.calibration import calibration_examples
from quantpress.config import CalibrationConfig, ChatConfig, Method, QuantConfig, recommended, variant_name
from quantpress.datasets import check_dataset
from quantpress.errors import CheckpointError, ConfigError, UnsupportedArchitecture
from quantpress.formats.gptq_config import quantize_config_dict
from quantpress.formats.gptq_tensors import (
    CheckpointFormat,
    from_gptq_tensors,
    to_gptq_tensors,
)
from quantpress.formats.hf_folder import (
    INDEX_NAME,
    MAX_SHARD_BYTES,
    SHARD_RE,
    TOKENIZER_FILES,
    ModelFolder,
    TensorFiles,
    atomic_save_tensors,
    atomic_write_json,
    copy_side_files,
    has_tokenizer,
    load_tokenizer,
    read_json,
    write_sharded,
)
from quantpress.layerwise import (
    LayerInputs,
    ModuleResult,
    capture_layer_inputs,
    collect_hessians,
    forward_layer_,
    quantize_and_propagate,
    quantize_group,
    signround_targets,
)
from quantpress.mixed_precision import Candidate, choose_upgrades, dynamic_overrides
from quantpress.models.arch import Architecture, architecture_for
from quantpress.models.skeleton import (
    assign_weights,
    build_on_meta,
    hf_config,
    materialize_buffers,
    release,
    return_freed_memory,
)
from quantpress.outputs import check_disjoint, check_replaceable, check_writable, resolved
from quantpress.staging import Staging


Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ModuleStat:
    name: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    loss: float
    damp_percent: float
    # with an upgrade budget (mixed_precision.py): output errors at the base and upgrade bit
    # widths, the module's packed bytes and what the upgrade would add
    error: float = 0.0
    upgrade_error: float = 0.0
    base_bytes: int = 0
    extra_bytes: int = 0


@dataclass(frozen=True)
class QuantizeReport:
    out_dir: Path
    quant: QuantConfig
    calibration: CalibrationConfig | None
    checkpoint_format: CheckpointFormat
    seconds: float
    size_bytes: int  # all weight files in out_dir
    num_layers: int
    resumed_layers: int  # layers taken from an interrupted run's staging folder
    modules: list[ModuleStat] = field(default_factory=list)
    upgraded: list[str] = field(default_factory=list)  # modules stored at UPGRADE_BITS


def checkpoint_format_for(quant: QuantConfig) -> CheckpointFormat:
    """v1 ("gptq") for sym — every loader reads it; v2 for asym, where v1's stored zero-1
    would corrupt packed words whenever a zero point is 0 (spec A4)."""
    return CheckpointFormat.GPTQ if quant.sym else CheckpointFormat.GPTQ_V2


def quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    quant: QuantConfig | None = None,
    calibration: CalibrationConfig | None = CalibrationConfig(),
    *,
    examples: Tensor | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
    chat: ChatConfig = ChatConfig(),
) -> QuantizeReport:
    """Quantize a local Hugging Face causal-LM folder into a GPTQ folder.

    `examples` ([n, seqlen] int64) replaces sampling from `calibration.dataset`, e.g. to give two
    tools identical windows. RTN needs no calibration; pass `calibration=None` for it. `chat` is
    recorded in quantize_config.json for chat/serve. `quant=None` is `config.recommended()`.
    """
    started = time.perf_counter()
    quant = quant or recommended()
    if quant.calibrated and calibration is None:
        raise ConfigError(f"{quant.method.value} needs a calibration config (only RTN runs without data)")
    if quant.method is Method.RTN:
        calibration = examples = None  # RTN reads no data; nothing about data goes in its config
    job = _Job(resolved(out_dir), quant)
    source, arch, config = _preflight(model_dir, [job], calibration, examples, overwrite=overwrite)
    if calibration is not None:
        examples = _resolve_examples(source.path, config, calibration, examples)
    job.open(_fingerprint(source, quant, calibration, examples, job.hessian_inputs))
    if not job.staging.assembled:
        _quantize_layers(source, arch, config, quant, calibration, examples, job.staging, job.done, batch_size,
                         progress)
    return _finish(source, arch, config, job, calibration, max_shard_bytes, started, chat, progress)


def preflight(model_dir: str | Path, out_dir: str | Path, quant: QuantConfig | None = None,
              calibration: CalibrationConfig | None = CalibrationConfig(), *, overwrite: bool = False) -> None:
    """Run every check `quantize` runs before its first forward pass, and nothing else: callers
    with work of their own before quantizing (the CLI's full-precision evaluation) call it first."""
    quant = quant or recommended()
    _preflight(model_dir, [_Job(resolved(out_dir), quant)], calibration if quant.calibrated else None,
               None, overwrite=overwrite)


def quantize_shared(
    model_dir: str | Path,
    targets: Sequence[tuple[str | Path, QuantConfig]],
    calibration: CalibrationConfig,
    *,
    examples: Tensor | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
    chat: ChatConfig = ChatConfig(),
) -> list[QuantizeReport]:
    """Quantize several GPTQ variants from ONE pass of the full-precision model over the data.

    Each layer's Hessians are collected once, from the full-precision layer's inputs, and every
    variant's GPTQ solve uses them. That saves a forward pass and Hessian accumulation per extra
    variant, but it is not sequential GPTQ: there, layer i's Hessians come from the outputs of the
    already *quantized* layers 0..i-1 and the later Linears of a layer see its quantized earlier
    ones. So every QuantConfig must say `true_sequential=False`, and quantize_config.json records
    `meta.hessian_inputs = "full_precision"`. Each variant stages and resumes per layer exactly
    as `quantize` does.
    """
    started = time.perf_counter()
    jobs = [_Job(resolved(out), quant, hessian_inputs="full_precision") for out, quant in targets]
    for job in jobs:
        if job.quant.method is not Method.GPTQ or job.quant.true_sequential:
            raise ConfigError("shared calibration is for GPTQ with true_sequential=False: every Hessian "
                              f"comes from the full-precision model ({variant_name(job.quant)})")
    if len({job.out_dir for job in jobs}) != len(jobs):
        raise ConfigError("two shared-calibration targets have the same output folder")
    source, arch, config = _preflight(model_dir, jobs, calibration, examples, overwrite=overwrite)
    examples = _resolve_examples(source.path, config, calibration, examples)
    for job in jobs:
        job.open(_fingerprint(source, job.quant, calibration, examples, job.hessian_inputs))
    todo = [job for job in jobs if not job.staging.assembled]
    if todo:
        _quantize_layers_shared(source, arch, config, todo, calibration, examples, batch_size, progress)
    return [_finish(source, arch, config, job, calibration, max_shard_bytes, started, chat, progress) for job in jobs]


@dataclass
class _Job:
    """One variant being written: its output folder, settings and how many layers are staged."""

    out_dir: Path
    quant: QuantConfig
    hessian_inputs: str = "quantized"  # or "full_precision" (quantize_shared)
    done: int = 0

    @property
    def staging(self) -> Staging:
        return Staging(self.out_dir)

    def open(self, fingerprint: dict) -> None:
        self.done = int(self.staging.open(fingerprint).get("layers_done", 0))


def _preflight(model_dir: str | Path, jobs: Sequence[_Job], calibration: CalibrationConfig | None,
               examples: Tensor | None, *, overwrite: bool) -> tuple[ModelFolder, Architecture, object]:
    """Every check that needs no forward pass, before any work: where the outputs go, the source
    folder and its tensors, the calibration text and tokenizer."""
    dataset = None
    if calibration is not None and examples is None:
        dataset = check_dataset(calibration.dataset)
    for job in jobs:
        check_disjoint(job.out_dir, {"model folder": model_dir, "calibration text": dataset})
        job.staging.recover()
        check_replaceable(job.out_dir, overwrite=overwrite, ours=not_a_quantized_folder, what="quantized model")
        job.staging.check_ours()
        check_writable(job.staging.path)
    source, arch, config = _open_source(model_dir)
    if calibration is not None and examples is None and not has_tokenizer(source.path):
        raise CheckpointError(f"{source.path} has no tokenizer (tokenizer.json or tokenizer.model), which GPTQ "
                              "needs to tokenize its calibration text; copy the base model's tokenizer files in")
    return source, arch, config


# What a quantize output holds: the only files `--overwrite` may replace.
_OUTPUT_FILES = {"config.json", "quantize_config.json", "quantize_log.json", INDEX_NAME, *TOKENIZER_FILES}


def not_a_quantized_folder(folder: Path) -> str | None:
    """None when `folder` is a quantize output (quantpress's quantizer in quantize_config.json,
    nothing but the files quantize writes); else why not."""
    try:
        quantizers = read_json(folder / "quantize_config.json").get("meta", {}).get("quantizer") or []
    except CheckpointError as e:
        return str(e)
    if not any(str(q).startswith("quantpress:") for q in quantizers):
        return "its quantize_config.json was written by another tool"
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OUTPUT_FILES and not SHARD_RE.fullmatch(p.name))
    if foreign:
        return f"it holds files quantize does not write: {', '.join(foreign[:5])}"
    return None


def _open_source(model_dir: str | Path) -> tuple[ModelFolder, Architecture, object]:
    """The source folder, its table entry and transformers config, after every up-front check."""
    source = ModelFolder(model_dir)
    arch = architecture_for(source.config)
    config = hf_config(source.config)
    _check_uniform_attention(config)
    _check_packable(source, arch)
    return source, arch, config


def _finish(source, arch, config, job: _Job, calibration, max_shard_bytes: int, started: float, chat: ChatConfig,
            progress: Progress | None) -> QuantizeReport:
    staging = job.staging
    stats = [ModuleStat(**m) for m in staging.state()["modules"]]
    upgraded = _upgrades(stats, job.quant)
    if not staging.assembled:
        final = staging.begin_final()
        _assemble(source, staging, final, arch, job.quant, calibration, max_shard_bytes, job.hessian_inputs, chat,
                  upgraded)
        atomic_write_json(final / "quantize_log.json", [asdict(m) for m in stats])
    staging.publish(None if progress is None else lambda step, total: progress("publish", step, total))
    size = sum(p.stat().st_size for p in job.out_dir.glob("*.safetensors"))
    return QuantizeReport(job.out_dir, job.quant, calibration, checkpoint_format_for(job.quant),
                          time.perf_counter() - started, size, config.num_hidden_layers, job.done, stats, upgraded)


def _upgrades(stats: list[ModuleStat], quant: QuantConfig) -> list[str]:
    if not quant.upgrade_budget:
        return []
    return choose_upgrades([Candidate(m.name, m.error, m.upgrade_error, m.base_bytes, m.extra_bytes) for m in stats],
                           quant.upgrade_budget)


def _check_uniform_attention(config) -> None:
    """Layer inputs are captured once, at layer 0, with layer 0's attention mask; a model that
    mixes full and sliding-window layers would need one mask per layer type."""
    kinds = set(getattr(config, "layer_types", None) or [])
    if len(kinds) > 1:
        raise UnsupportedArchitecture(
            f"layers mix attention types {sorted(kinds)}; quantpress supports one attention type per model for now"
        )


def _check_packable(source: ModelFolder, arch: Architecture) -> None:
    """Fail before any work if a Linear cannot be stored in the GPTQ layout."""
    for name in arch.quantized_modules:
        out_features, in_features = source.shape(f"{arch.layers}.0.{name}.weight")
        for what, dim in (("in_features", in_features), ("out_features", out_features)):
            if dim % 32:
                raise ConfigError(
                    f"{name}.{what} = {dim} is not a multiple of 32, which the GPTQ packed layout "
                    "needs (qweight packs along in_features, qzeros along out_features)"
                )


def _resolve_examples(model_dir: Path, config, calibration: CalibrationConfig, examples: Tensor | None) -> Tensor:
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len is not None and calibration.seqlen > max_len:
        raise ConfigError(f"calibration seqlen {calibration.seqlen} exceeds the model's max_position_embeddings {max_len}")
    if examples is None:
        examples = calibration_examples(load_tokenizer(model_dir), calibration)
    if examples.ndim != 2 or examples.dtype != torch.int64:
        raise ConfigError(f"examples must be an int64 [n, seqlen] tensor, got {examples.dtype} {list(examples.shape)}")
    if int(examples.max()) >= config.vocab_size or int(examples.min()) < 0:
        raise ConfigError("examples hold token ids outside the model's vocabulary")
    return examples


def _fingerprint(source: ModelFolder, quant: QuantConfig, calibration: CalibrationConfig | None,
                 examples: Tensor | None, hessian_inputs: str) -> dict:
    """What a staged layer depends on; a staging folder with another fingerprint is discarded."""
    digest = None if examples is None else hashlib.sha256(examples.numpy().tobytes()).hexdigest()
    return {
        "quantpress": __version__,
        "source_config": source.config,
        "source_files": source.weight_stamps(),
        "quant": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(quant).items()},
        "calibration": None if calibration is None else asdict(calibration),
        "examples_sha256": digest,
        "hessian_inputs": hessian_inputs,
    }


def _layer_file(staging: Staging, index: int) -> Path:
    return staging.pieces / f"layer-{index:05d}.safetensors"


def _upgrade_file(staging: Staging, index: int) -> Path:
    return staging.pieces / f"upgrade-{index:05d}.safetensors"


def _quantize_layers(source, arch, config, quant, calibration, examples, staging, done, batch_size, progress) -> None:
    # RTN runs no forward pass; its layers only carry the fake-quant weights, in any dtype.
    dtype = getattr(torch, calibration.compute_dtype) if calibration is not None else torch.bfloat16
    model = build_on_meta(config, dtype)
    materialize_buffers(model)
    base = model.get_submodule(arch.layers.rpartition(".")[0])
    layers = model.get_submodule(arch.layers)
    inputs: LayerInputs | None = None
    if quant.calibrated:
        embed = base.get_input_embeddings()
        assign_weights(embed, {"weight": source.get(_embed_key(model, embed))}, "embed_tokens")
        inputs = capture_layer_inputs(base, layers, examples)
        if quant.method is Method.SIGNROUND and quant.signround_target == "model":
            inputs = inputs.with_reference()
        release(embed)

    total = len(layers)
    for i, layer in enumerate(layers):
        prefix = f"{arch.layers}.{i}."
        state = {k[len(prefix):]: v for k, v in source.read(source.with_prefix(prefix)).items()}
        assign_weights(layer, state, f"layer {i}")
        last = i + 1 == total  # its output feeds nothing
        if i < done:  # staged by an interrupted run: restore its quantized weights, skip the work
            if inputs is not None:
                if inputs.reference is not None:  # the full-precision stream passes the fp layer, as it did
                    signround_targets(layer, inputs, batch_size)
                _load_staged_into(layer, _layer_file(staging, i), prefix, arch, quant)
                if not last:
                    forward_layer_(layer, inputs, batch_size)
        else:
            results = quantize_and_propagate(layer, arch, inputs, quant, batch_size=batch_size,
                                             where=prefix.rstrip("."), source=state, propagate=not last)
            _stage_layer(staging, i, prefix, state, results, checkpoint_format_for(quant))
        release(layer)
        return_freed_memory()
        if progress is not None:
            progress("layer", i + 1, total)


def _quantize_layers_shared(source, arch, config, jobs: list[_Job], calibration, examples, batch_size,
                            progress) -> None:
    """The layer loop of `quantize_shared`: the model stays full precision throughout."""
    model = build_on_meta(config, getattr(torch, calibration.compute_dtype))
    materialize_buffers(model)
    base = model.get_submodule(arch.layers.rpartition(".")[0])
    layers = model.get_submodule(arch.layers)
    embed = base.get_input_embeddings()
    assign_weights(embed, {"weight": source.get(_embed_key(model, embed))}, "embed_tokens")
    inputs = capture_layer_inputs(base, layers, examples)
    release(embed)

    groups = list(arch.input_groups)
    total = len(layers)
    for i, layer in enumerate(layers):
        prefix = f"{arch.layers}.{i}."
        state = {k[len(prefix):]: v for k, v in source.read(source.with_prefix(prefix)).items()}
        assign_weights(layer, state, f"layer {i}")
        todo = [job for job in jobs if job.done <= i]
        # All Hessians come from one pass over the full-precision layer, which then produces
        # the next layer's inputs; only after that may the solves overwrite its weights.
        hessians = collect_hessians(layer, groups, inputs, batch_size) if todo else {}
        if i + 1 < total and any(job.done < total for job in jobs):
            forward_layer_(layer, inputs, batch_size)
        for job in todo:
            results = [r for group in groups
                       for r in quantize_group(layer, group, hessians[group], job.quant, prefix.rstrip("."), state)]
            _stage_layer(job.staging, i, prefix, state, results, checkpoint_format_for(job.quant))
        release(layer)
        return_freed_memory()
        if progress is not None:
            progress("layer", i + 1, total)


def _embed_key(model: torch.nn.Module, embed: torch.nn.Module) -> str:
    """Checkpoint name of the input embedding, found by identity rather than by name pattern."""
    return next(f"{name}.weight" for name, module in model.named_modules() if module is embed)


def _stage_layer(staging: Staging, index: int, prefix: str, state: dict, results: list[ModuleResult], fmt) -> None:
    """Write one finished layer: packed GPTQ tensors plus its other tensors (norms) unchanged."""
    quantized = {r.name for r in results}
    tensors = {prefix + k: v for k, v in state.items() if k.rpartition(".")[0] not in quantized}
    upgrades = {}  # the same tensor names at UPGRADE_BITS, in a file of their own
    stats = []
    for r in results:
        packed = to_gptq_tensors(r.weight, fmt)
        tensors |= {f"{prefix}{r.name}.{suffix}": tensor for suffix, tensor in packed.items()}
        if r.bias is not None:
            tensors[f"{prefix}{r.name}.bias"] = r.bias
        stat = ModuleStat(prefix + r.name, r.loss, r.damp_percent)
        if r.upgrade is not None:
            high = to_gptq_tensors(r.upgrade, fmt)
            upgrades |= {f"{prefix}{r.name}.{suffix}": tensor for suffix, tensor in high.items()}
            base_bytes = sum(t.nbytes for t in packed.values())
            stat = replace(stat, error=r.error, upgrade_error=r.upgrade_error, base_bytes=base_bytes,
                           extra_bytes=sum(t.nbytes for t in high.values()) - base_bytes)
        stats.append(asdict(stat))
    if upgrades:
        atomic_save_tensors(_upgrade_file(staging, index), upgrades)
    atomic_save_tensors(_layer_file(staging, index), tensors)
    # The layer's files are complete on disk before the manifest counts it: a kill between the
    # two just redoes this layer.
    staging.update(layers_done=index + 1, modules=staging.state()["modules"] + stats)


def _load_staged_into(layer, file: Path, prefix: str, arch: Architecture, quant: QuantConfig) -> None:
    """Put a staged layer's dequantized weights into the live layer (resume path). The manifest
    fingerprint matched, so the staged file was written with this same `quant`."""
    staged = TensorFiles([file])
    for name in arch.quantized_modules:
        tensors = staged.read(f"{prefix}{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))
        weight = from_gptq_tensors({k.rpartition(".")[2]: v for k, v in tensors.items()}, quant.bits,
                                   checkpoint_format_for(quant))
        linear = layer.get_submodule(name)
        linear.weight.data = weight.dequantize().to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = staged.get(f"{prefix}{name}.bias").to(linear.bias.dtype)


def _assemble(source, staging: Staging, final: Path, arch, quant, calibration, max_shard_bytes,
              hessian_inputs: str, chat: ChatConfig, upgraded: list[str]) -> None:
    """Final weight files + configs in `final`, from the staged layers and the source."""
    staged = TensorFiles(sorted(staging.pieces.glob("layer-*.safetensors")))
    upgrades = TensorFiles(sorted(staging.pieces.glob("upgrade-*.safetensors"))) if upgraded else None
    _write_weights(source, staged, upgrades, set(upgraded), arch, quant, final, max_shard_bytes)
    fmt = checkpoint_format_for(quant)
    qconfig = quantize_config_dict(quant, calibration, fmt, tool_version=__version__,
                                   model_name_or_path=source.config.get("_name_or_path"),
                                   hessian_inputs=hessian_inputs if calibration is not None else None, chat=chat,
                                   dynamic=dynamic_overrides(upgraded))
    atomic_write_json(final / "quantize_config.json", qconfig)
    atomic_write_json(final / "config.json", {**source.config, "quantization_config": qconfig})
    copy_side_files(source.path, final)


def _write_weights(source: ModelFolder, staged: TensorFiles, upgrades: TensorFiles | None, upgraded: set[str],
                   arch, quant, staging, max_shard_bytes) -> None:
    """Tensors outside the layers come from the source, layer tensors from the staged files, and
    the packed tensors of upgraded modules from the upgrade files."""
    outside = [n for n in source.names() if not n.startswith(arch.layers + ".")]

    def files_of(name: str) -> TensorFiles:
        module, _, suffix = name.rpartition(".")
        if module in upgraded and suffix in ("qweight", "qzeros", "scales", "g_idx"):
            return upgrades
        return staged if name in staged.file_of else source

    entries = [source.entry(n) for n in outside]
    entries += [files_of(n).entry(n) for n in staged.names()]  # staged files are in layer order

    def load(name: str) -> Tensor:
        return files_of(name).get(name)

    metadata = {"format": "pt", "quantizer": f"quantpress:{__version__}", "bits": str(quant.bits),
                "group_size": str(quant.group_size), "checkpoint_format": checkpoint_format_for(quant).value}
    write_sharded(staging, entries, load, max_shard_bytes, metadata)
