"""release(): one recipe -> every variant quantized, measured and committed on its own branch.

Per variant: quantize (resumable per layer, see pipeline.py) -> evaluate -> commit its files to
its branch (the model alone) -> drop the local folder. When every variant is done, the card is
rendered from the measurements and committed to every branch. Each finished step leaves a record
whose fingerprint covers everything the step depends on, so a re-run redoes only what changed
and an interrupted run resumes at the step (and layer) it stopped in. Branches move only by
compare-and-swap to complete commits (git.py).

Work files live in `<repo>/.git/quantpress/`, each named after its branch through
`ReleaseRepo.branch_file` (so only after git has accepted the name):
    baseline.json                 full-precision measurement
    merged/                       the model with a LoRA adapter merged in (`merge_lora`)
    variants/<branch>[.partial]/  a variant being quantized (pipeline staging)
    variants/<branch>.done.json   the quantize step finished with this fingerprint
    results/<branch>.json         VariantResult: measured, with its fingerprint

Nothing is written before the checks that need no model run have passed: the repository may not
be, contain or sit inside the model or adapter folder, and must be a release quantpress made (or
a new or empty folder; git.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import Tensor

from quantpress import __version__
from quantpress.api import compare, default_seqlen, evaluate, load
from quantpress.calibration import calibration_examples
from quantpress.config import CalibrationConfig, ChatConfig
from quantpress.formats.hf_folder import ModelFolder, atomic_write_json, load_tokenizer
from quantpress.models.arch import architecture_for
from quantpress.outputs import check_disjoint
from quantpress.pipeline import quantize, quantize_shared
from quantpress.release.card import CardData, plot_perplexity_vs_size, render_card
from quantpress.release.git import GITATTRIBUTES, ReleaseRepo
from quantpress.release.recipe import Recipe, Variant
from quantpress.release.results import (
    Baseline,
    VariantResult,
    read_result,
    write_result,
)

PLOT_FILE = "perplexity-vs-size.png"
TRAILER = "Quantpress-Variant"  # commit trailer: the fingerprint of the variant a branch holds
ReleaseProgress = Callable[[str, str, int, int], None]  # (stage, branch, done, total)


@dataclass(frozen=True)
class EvalSettings:
    dataset: str = "wikitext2"
    max_windows: int | None = None  # None: the whole evaluation split


@dataclass(frozen=True)
class ReleaseReport:
    repo: Path
    branches: dict[str, str]  # branch -> commit
    results: list[VariantResult]  # recipe order
    quantized: list[str]  # branches quantized (or resumed) by this run; the others were reused
    seconds: float


def release(
    model_dir: str | Path,
    out_repo: str | Path,
    recipe: Recipe,
    *,
    shared_calibration: bool = False,
    evaluation: EvalSettings = EvalSettings(),
    merge_lora: str | Path | None = None,
    batch_size: int = 8,
    progress: ReleaseProgress | None = None,
) -> ReleaseReport:
    """Write (or bring up to date) a release repository for `recipe`. `merge_lora` names a PEFT
    LoRA adapter folder merged into the model before quantizing (the Guanaco recipe)."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    check_disjoint(out_repo, {"model folder": model_dir, "LoRA adapter": merge_lora})
    source = ModelFolder(model_dir)
    architecture_for(source.config)  # a missing model or unsupported family fails before any work
    repo = ReleaseRepo.open_or_init(out_repo)
    # Before the merge: the merged folder carries the base's tokenizer, and a missing one fails here.
    examples = _calibration_sets(model_dir, recipe)
    if merge_lora is not None:
        from quantpress.release.lora import merge_lora as merge

        model_dir = merge(model_dir, Path(merge_lora), repo.work_dir / "merged")
        source = ModelFolder(model_dir)
    chat = ChatConfig(recipe.model.prompt_template, recipe.model.system_prompt)
    fingerprints = {v.branch: _fingerprint(source, v, examples[v.calibration], shared_calibration, evaluation, chat)
                    for v in recipe.variants}
    baseline = _baseline(source, repo.work_dir, evaluation)

    todo = [v for v in recipe.variants if not _committed(repo, v.branch, fingerprints[v.branch])]
    pending = [v for v in todo if not _quantized(repo, v.branch, fingerprints[v.branch])]
    if shared_calibration:
        _quantize_shared(model_dir, repo, pending, examples, fingerprints, chat, batch_size, progress)
    for v in todo:  # one variant at a time: at most one unpublished variant folder on disk
        if not _quantized(repo, v.branch, fingerprints[v.branch]):
            _quantize_one(model_dir, repo, v, examples[v.calibration], fingerprints[v.branch], chat, batch_size, progress)
        result = _measure(repo, v, fingerprints[v.branch], shared_calibration, evaluation, source.path, progress)
        _commit_model(repo, v.branch, result)

    results = [read_result(_result_file(repo, v.branch)) for v in recipe.variants]
    card_files = _render_card(repo, recipe, baseline, results)
    heads = {v.branch: _commit_card(repo, v.branch, fingerprints[v.branch], card_files) for v in recipe.variants}
    repo.check_out_main()
    return ReleaseReport(repo.path, heads, results, [v.branch for v in pending], time.perf_counter() - started)


def _calibration_sets(model_dir: Path, recipe: Recipe) -> dict[CalibrationConfig, Tensor]:
    """Token windows per distinct calibration config, sampled once and shared by its variants."""
    tokenizer = load_tokenizer(model_dir)
    return {c: calibration_examples(tokenizer, c) for c in dict.fromkeys(v.calibration for v in recipe.variants)}


def _fingerprint(source: ModelFolder, variant: Variant, examples: Tensor, shared: bool, evaluation: EvalSettings,
                 chat: ChatConfig) -> str:
    """Everything a variant's files and numbers depend on (its description only reaches the card)."""
    quant = {k: getattr(v, "value", v) for k, v in asdict(variant.quant).items()}
    record = {"quantpress": __version__, "config": source.config, "files": source.weight_stamps(), "quant": quant,
              "calibration": asdict(variant.calibration),
              "examples_sha256": hashlib.sha256(examples.numpy().tobytes()).hexdigest(),
              "hessian_inputs": _hessian_inputs(shared), "evaluation": asdict(evaluation), "chat": asdict(chat)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _hessian_inputs(shared: bool) -> str:
    return "full_precision" if shared else "quantized"


def _baseline(source: ModelFolder, work: Path, evaluation: EvalSettings) -> Baseline:
    """The full-precision perplexity, measured once per source model and eval setting."""
    path = work / "baseline.json"
    key = {"config": source.config, "evaluation": asdict(evaluation),
           "files": source.weight_stamps()}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            b = stored["baseline"]
            return Baseline(**{**b, "linear_shapes": {k: tuple(v) for k, v in b["linear_shapes"].items()}})
    arch = architecture_for(source.config)
    shapes = {name: tuple(source.shape(f"{arch.layers}.0.{name}.weight")) for name in arch.quantized_modules}
    result = evaluate(source.path, evaluation.dataset, default_seqlen(source.config), max_windows=evaluation.max_windows)
    size = sum(p.stat().st_size for p in source.path.glob("*.safetensors"))
    baseline = Baseline(result.perplexity, evaluation.dataset, result.seqlen, result.windows, size, shapes)
    atomic_write_json(path, {"key": key, "baseline": asdict(baseline)})
    return baseline


def _variant_dir(repo: ReleaseRepo, branch: str) -> Path:
    return repo.branch_file("variants", branch)


def _done_file(repo: ReleaseRepo, branch: str) -> Path:
    return repo.branch_file("variants", branch, ".done.json")


def _result_file(repo: ReleaseRepo, branch: str) -> Path:
    return repo.branch_file("results", branch, ".json")


def _committed(repo: ReleaseRepo, branch: str, fingerprint: str) -> bool:
    """The branch already holds this exact variant, and its measurement is on record."""
    head = repo.branches().get(branch)
    result = read_result(_result_file(repo, branch))
    return (head is not None and f"{TRAILER}: {fingerprint}" in repo.message(head)
            and result is not None and result.fingerprint == fingerprint)


def _quantized(repo: ReleaseRepo, branch: str, fingerprint: str) -> bool:
    done = _done_file(repo, branch)
    return (done.exists() and _variant_dir(repo, branch).is_dir()
            and json.loads(done.read_text()).get("fingerprint") == fingerprint)


def _on_layer(progress: ReleaseProgress | None, branch: str):
    return None if progress is None else (lambda _stage, done, total: progress("quantize", branch, done, total))


def _quantize_one(model_dir, repo, variant: Variant, examples: Tensor, fingerprint: str, chat: ChatConfig, batch_size,
                  progress) -> None:
    report = quantize(model_dir, _variant_dir(repo, variant.branch), variant.quant, variant.calibration,
                      examples=examples, overwrite=True, batch_size=batch_size,
                      progress=_on_layer(progress, variant.branch), chat=chat)
    _mark_quantized(repo, variant.branch, fingerprint, report.seconds, report.resumed_layers)


def _quantize_shared(model_dir, repo, pending: list[Variant], examples, fingerprints, chat: ChatConfig, batch_size,
                     progress) -> None:
    """One full-precision pass per calibration set serves all its variants (pipeline.quantize_shared)."""
    for calibration in dict.fromkeys(v.calibration for v in pending):
        group = [v for v in pending if v.calibration == calibration]
        targets = [(_variant_dir(repo, v.branch), replace(v.quant, true_sequential=False)) for v in group]
        started = time.perf_counter()
        reports = quantize_shared(model_dir, targets, calibration, examples=examples[calibration], overwrite=True,
                                  batch_size=batch_size, progress=_on_layer(progress, ",".join(v.branch for v in group)),
                                  chat=chat)
        seconds = (time.perf_counter() - started) / len(group)  # the shared pass, split evenly
        for v, report in zip(group, reports):
            _mark_quantized(repo, v.branch, fingerprints[v.branch], seconds, report.resumed_layers)


def _mark_quantized(repo: ReleaseRepo, branch: str, fingerprint: str, seconds: float, resumed_layers: int) -> None:
    atomic_write_json(_done_file(repo, branch),
                      {"fingerprint": fingerprint, "seconds": seconds, "resumed_layers": resumed_layers})


def _measure(repo, variant: Variant, fingerprint: str, shared: bool, evaluation: EvalSettings, reference: Path,
             progress) -> VariantResult:
    """Perplexity, agreement with `reference` (the full-precision source) and size of a quantized
    variant folder (reused when already on record)."""
    stored = read_result(_result_file(repo, variant.branch))
    if stored is not None and stored.fingerprint == fingerprint:
        return stored
    folder = _variant_dir(repo, variant.branch)
    if progress is not None:
        progress("evaluate", variant.branch, 0, 1)
    loaded = load(folder, exact=True)  # as `quantpress eval`: the card measures the weights, not the bf16 kernels
    result = evaluate(loaded, evaluation.dataset, None, max_windows=evaluation.max_windows)
    agreement = compare(loaded, reference, evaluation.dataset, result.seqlen, max_windows=evaluation.max_windows)
    done = json.loads(_done_file(repo, variant.branch).read_text())
    quant = replace(variant.quant, true_sequential=False) if shared else variant.quant
    measured = VariantResult(
        branch=variant.branch, quant=quant, calibration=variant.calibration, description=variant.description,
        hessian_inputs=_hessian_inputs(shared), size_bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        perplexity=result.perplexity, quantize_seconds=done["seconds"], eval_seconds=result.seconds,
        fingerprint=fingerprint, kl_divergence=agreement.kl_divergence, top1=agreement.top1,
    )
    write_result(_result_file(repo, variant.branch), measured)
    return measured


def _commit_model(repo: ReleaseRepo, branch: str, result: VariantResult) -> None:
    """Put the variant's finished folder on its branch (no card yet), then drop the folder."""
    folder = _variant_dir(repo, branch)
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
    files[".gitattributes"] = _gitattributes(repo)
    repo.commit_branch(branch, files, _message(branch, result.fingerprint, "model files"))
    shutil.rmtree(folder)  # its files are in the object store now; a re-run reads them from there


def _gitattributes(repo: ReleaseRepo) -> Path:
    path = repo.work_dir / "gitattributes"
    path.write_text(GITATTRIBUTES)
    return path


def _message(branch: str, fingerprint: str, what: str) -> str:
    return f"{branch}: {what}\n\n{TRAILER}: {fingerprint}\n"


def _render_card(repo: ReleaseRepo, recipe: Recipe, baseline: Baseline, results: list[VariantResult]) -> dict[str, Path]:
    """README.md and the plot, rendered once and committed identically to every branch."""
    ordered = sorted(results, key=lambda r: r.branch != "main")  # stable: main first, then recipe order
    data = CardData(recipe.model, baseline, tuple(ordered), PLOT_FILE, __version__)
    out = repo.work_dir / "card"
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(render_card(data), encoding="utf-8")
    plot_perplexity_vs_size(data, out / PLOT_FILE)
    return {"README.md": out / "README.md", PLOT_FILE: out / PLOT_FILE}


def _commit_card(repo: ReleaseRepo, branch: str, fingerprint: str, card_files: dict[str, Path]) -> str:
    head = repo.branches()[branch]
    return repo.commit_branch(branch, card_files, _message(branch, fingerprint, "model card"), start_from=head)
