"""The release's README.md: a TheBloke-style model card rendered from measured records.

Every number comes from the Baseline and VariantResult records and every Yes/No from
`formats.compat`; the Jinja template only lays out strings prepared here, so formatting rules
(units, decimals, Markdown escaping) live in one place and are unit-testable.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import jinja2
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quantpress.config import Method, QuantConfig
from quantpress.errors import ConfigError
from quantpress.formats import compat
from quantpress.pipeline import checkpoint_format_for
from quantpress.prompts import prompt_template
from quantpress.release.recipe import ModelInfo
from quantpress.release.results import Baseline, VariantResult

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "model_card.md.j2"
HUB = "https://huggingface.co"
EXAMPLE_PROMPT = "Tell me about AI"
# The sampling settings the usage examples show (TheBloke's cards used the same).
EXAMPLE_SAMPLING = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}
DATASET_LABELS = {"wikitext2": "wikitext-2"}
HESSIAN_INPUTS = {
    "quantized": "each layer's Hessian comes from the outputs of the layers already quantized before it "
                 "(sequential GPTQ, as in the paper and AutoGPTQ)",
    "full_precision": "every layer's Hessian comes from the full-precision model's activations, computed once "
                      "and shared by the variants (shared calibration)",
}


@dataclass(frozen=True)
class CardData:
    model: ModelInfo
    baseline: Baseline
    variants: tuple[VariantResult, ...]  # card order: the `main` branch first, then recipe order
    plot_file: str  # relative path of the PNG committed next to README.md, e.g. "perplexity-vs-size.png"
    quantpress_version: str


# ---------------------------------------------------------------------------------------------
# Formatting helpers: one rule per kind of number, shared by the tables and the plot.

def human_size(n_bytes: int) -> str:
    """Decimal units with 2 decimals, as TheBloke's tables ("4.16 GB", "3.71 MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def format_ppl(ppl: float) -> str:
    return f"{ppl:.3f}"


def format_delta(ppl: float, baseline: float) -> str:
    """Relative perplexity change vs full precision, signed: "+0.06%"; "±0.00%" when it rounds to
    zero (a "-0.00%" would read as a gain)."""
    percent = round((ppl - baseline) / baseline * 100, 2)
    return "±0.00%" if percent == 0 else f"{percent:+.2f}%"


def format_group_size(group_size: int) -> str:
    return "None" if group_size == -1 else str(group_size)  # TheBloke writes "None" for -1


def yes_no(value: bool) -> str:
    return "Yes" if value else "No"


def table_cell(text: str) -> str:
    """One GFM table cell: a `|` would end the cell and a newline the row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code_fence(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so the block cannot end early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def dataset_label(dataset: str) -> str:
    """A bundled set's display name, or just the file name of a local text file."""
    return DATASET_LABELS.get(dataset, PurePath(dataset).name)


def act_order_label(quant: QuantConfig) -> str:
    """The card's Act Order cell: "Static" for act-order with static groups, whose files need no
    act-order at load time (`desc_act: false`, trivial g_idx), so loaders treat it as "No"."""
    return "Static" if quant.act_order and not quant.desc_act else yes_no(quant.act_order)


def _settings(quant: QuantConfig) -> str:
    group = "no group size" if quant.group_size == -1 else f"group size {quant.group_size}"
    return f"{quant.bits}-bit, {group}, act-order {act_order_label(quant).lower()}, {'sym' if quant.sym else 'asym'}"


# ---------------------------------------------------------------------------------------------
# Card sections as plain data for the template.

def repo_id(model: ModelInfo) -> str:
    if model.repo_id is not None:
        return model.repo_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-") or "model"
    return f"YOUR-ORG/{slug}-GPTQ"


def _base_model_id(original_model: str) -> str | None:
    """The Hub repo id for `base_model`, which the Hub validates; None for a non-Hub URL."""
    if original_model.startswith(HUB + "/"):
        return original_model.removeprefix(HUB + "/")
    return None if "://" in original_model else original_model


def _base_model_url(original_model: str) -> str:
    return original_model if "://" in original_model else f"{HUB}/{original_model}"


class _CardDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (prompt templates) as literal blocks, so the header
    shows a template as it prints; PyYAML falls back to quoting where a block cannot be exact."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_CardDumper.add_representer(str, _represent_str)


def front_matter(data: CardData) -> str:
    """The YAML header the Hub reads; dumped by PyYAML so any name or template quotes correctly."""
    model = data.model
    meta: dict[str, Any] = {}
    base_model = _base_model_id(model.original_model)
    if base_model is not None:
        meta["base_model"] = base_model
    meta.update({
        "model_creator": model.creator,
        "model_name": model.name,
        "license": model.license,
        "quantized_by": model.quantized_by,
        "prompt_template": prompt_template(model.prompt_template).render("{prompt}", model.system_prompt),
        "inference": False,
        "pipeline_tag": "text-generation",
        "tags": ["gptq", "quantpress"],
    })
    return yaml.dump(meta, Dumper=_CardDumper, sort_keys=False, allow_unicode=True)


def _file_row(v: VariantResult, shapes: compat.Shapes) -> dict[str, str]:
    calibrated = v.quant.method is not Method.RTN  # RTN sees no calibration data
    return {
        "branch": v.branch,
        "bits": str(v.quant.bits),
        "gs": format_group_size(v.quant.group_size),
        "act_order": act_order_label(v.quant),
        "damp": ("per module" if v.quant.damp_search else f"{v.quant.damp_percent:g}") if calibrated else "n/a (RTN)",
        "levers": ", ".join(_levers(v.quant)) or "—",
        "dataset": table_cell(dataset_label(v.calibration.dataset)) if calibrated else "n/a (RTN)",
        "seqlen": str(v.calibration.seqlen) if calibrated else "n/a",
        "size": human_size(v.size_bytes),
        "exllama": yes_no(compat.exllama(v.quant, shapes).ok),
        "marlin": yes_no(compat.marlin(v.quant, shapes).ok),
        "desc": table_cell(v.description),
    }


def _levers(quant: QuantConfig) -> list[str]:
    """The quality options beyond TheBloke's columns, as the card's Levers cell names them."""
    named = [(quant.static_groups, "static groups"), (quant.group_aware, "group-aware order"),
             (quant.mse and not quant.mse_weighted, "MSE range"), (quant.mse_weighted, "weighted MSE range"),
             (quant.damp_search, "damp search"),
             (quant.method is Method.SIGNROUND, f"SignRound ({quant.signround_iters} steps/layer)"),
             (quant.upgrade_budget > 0, f"8-bit outlier modules (+{quant.upgrade_budget:.0%} budget)")]
    return [name for on, name in named if on]


def _quality_row(v: VariantResult, baseline: Baseline) -> dict[str, str]:
    return {
        "branch": v.branch,
        "bits": str(v.quant.bits),
        "gs": format_group_size(v.quant.group_size),
        "act_order": act_order_label(v.quant),
        "ppl": format_ppl(v.perplexity),
        "delta": format_delta(v.perplexity, baseline.perplexity),
        "kl": "—" if v.kl_divergence is None else f"{v.kl_divergence:.4f}",
        "top1": "—" if v.top1 is None else f"{v.top1:.1%}",
        "size": human_size(v.size_bytes),
    }


def _calibration_groups(variants: tuple[VariantResult, ...]) -> list[dict[str, str]]:
    """Variants sharing calibration settings, so a uniform release reads as one sentence."""
    groups: dict[tuple[str, int, int, int, str], list[str]] = {}
    for v in variants:
        if v.quant.method is Method.RTN:
            continue
        if v.hessian_inputs not in HESSIAN_INPUTS:
            # a new mode must come with its explanation rather than leave the card vague
            raise ConfigError(f"{v.branch}: unknown hessian_inputs {v.hessian_inputs!r}; "
                              f"known: {', '.join(HESSIAN_INPUTS)}")
        c = v.calibration
        groups.setdefault((dataset_label(c.dataset), c.nsamples, c.seqlen, c.seed, v.hessian_inputs), []).append(v.branch)
    return [
        {"branches": ", ".join(f"`{b}`" for b in branches), "dataset": dataset, "nsamples": str(nsamples),
         "seqlen": str(seqlen), "seed": str(seed), "hessian_inputs": hessian,
         "hessian_explained": HESSIAN_INPUTS[hessian]}
        for (dataset, nsamples, seqlen, seed, hessian), branches in groups.items()
    ]


# Loader column -> rule; the order is the Compatibility table's.
LOADERS: tuple[tuple[str, Callable[[QuantConfig, compat.Shapes], compat.Compat]], ...] = (
    ("transformers / optimum", lambda q, _: compat.transformers(q)),
    ("GPTQModel", lambda q, _: compat.gptqmodel(q)),
    ("vLLM", compat.vllm),
    ("TGI", compat.tgi),
    ("ExLlama / ExLlamaV2", compat.exllama),
)


def _compat_rows(data: CardData) -> tuple[list[list[str]], list[str]]:
    """One table row of cells per branch (short verdicts), plus the reasons behind every "No"."""
    shapes = data.baseline.linear_shapes
    rows, reasons = [], []
    for v in data.variants:
        cells = [f"`{v.branch}`", f"`{checkpoint_format_for(v.quant).value}`"]
        for loader, rule in LOADERS:
            verdict = rule(v.quant, shapes)
            # a Yes names its kernel when the loader has several; a No's reason goes below the table
            note = verdict.reason if verdict.ok and loader in ("vLLM", "TGI") else ""
            cells.append(table_cell(f"{yes_no(verdict.ok)} ({note})" if note else yes_no(verdict.ok)))
            if not verdict.ok:
                reasons.append(f"`{v.branch}`, {loader}: {verdict.reason}")
        rows.append(cells)
    return rows, reasons


def _provenance_row(v: VariantResult) -> dict[str, str]:
    # No timings: they differ run to run, and the card must be a pure function of the files so
    # that a resumed release ends byte-identical to an uninterrupted one.
    return {"branch": v.branch, "settings": _settings(v.quant), "fingerprint": v.fingerprint[:12]}


def _py_str(text: str) -> str:
    """A double-quoted Python string literal: JSON's escapes are all valid Python escapes."""
    return json.dumps(text, ensure_ascii=False)


def _example_branch(variants: tuple[VariantResult, ...]) -> str:
    """A non-main branch shows the `:branch` syntax best; `main` when it is the only one."""
    return next((v.branch for v in variants if v.branch != "main"), variants[0].branch)


def _usage(template_text: str) -> dict[str, str]:
    """Strings the usage snippets embed, quoted for the language they are pasted into."""
    prompt = template_text.replace("{prompt}", EXAMPLE_PROMPT)
    body = {"inputs": prompt, "parameters": EXAMPLE_SAMPLING}
    return {
        "template_py": _py_str(template_text),
        "example_prompt_py": _py_str(EXAMPLE_PROMPT),
        "sampling_py": ", ".join(f"{k}={v!r}" for k, v in EXAMPLE_SAMPLING.items()),
        "curl_body": shlex.quote(json.dumps(body)),
    }


def card_context(data: CardData) -> dict[str, Any]:
    """Everything the template shows, already formatted and escaped."""
    if not data.variants:
        raise ConfigError("a card needs at least one variant")
    model, baseline = data.model, data.baseline
    template = prompt_template(model.prompt_template)
    template_text = template.render("{prompt}", model.system_prompt)
    rid = repo_id(model)
    compat_rows, compat_reasons = _compat_rows(data)
    return {
        "front_matter": front_matter(data),
        "model": model,
        "base_model_url": _base_model_url(model.original_model),
        "repo_id": rid,
        "repo_id_is_placeholder": model.repo_id is None,
        "local_dir": rid.split("/")[-1],
        "template_title": template.title,
        "template_text": template_text,
        "template_fence": code_fence(template_text),
        "file_rows": [_file_row(v, baseline.linear_shapes) for v in data.variants],
        "eval_label": dataset_label(baseline.eval_dataset),
        "baseline": {"ppl": format_ppl(baseline.perplexity), "size": human_size(baseline.size_bytes),
                     "seqlen": baseline.eval_seqlen, "windows": baseline.eval_windows},
        "quality_rows": [_quality_row(v, baseline) for v in data.variants],
        "calibration_groups": _calibration_groups(data.variants),
        "plot_file": data.plot_file,
        "compat_header": ["Branch", "Format", *(name for name, _ in LOADERS)],
        "compat_rows": compat_rows,
        "compat_reasons": compat_reasons,
        "provenance": [_provenance_row(v) for v in data.variants],
        "main_branch": data.variants[0].branch,
        "example_branch": _example_branch(data.variants),
        "usage": _usage(template_text),
        "version": data.quantpress_version,
    }


def md_row(cells: list[str]) -> str:
    """A table row of already-escaped cells, for tables whose columns are data."""
    return "| " + " | ".join(cells) + " |"


def md_separator(header: list[str]) -> str:
    return md_row(["-" * max(3, len(h)) for h in header])


def _environment() -> jinja2.Environment:
    # StrictUndefined: a typo in the template fails rendering instead of leaving a blank.
    # No autoescape: the output is Markdown, and cells are escaped by table_cell.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(md_row=md_row, md_separator=md_separator)
    return env


def render_card(data: CardData) -> str:
    """README.md for every branch of the release."""
    return _environment().get_template(TEMPLATE_NAME).render(card_context(data))


def plot_perplexity_vs_size(data: CardData, path: Path) -> None:
    """The card's perplexity-vs-size PNG: one labelled point per branch, the baseline dashed.

    Uses a private Figure with the Agg canvas, never pyplot, so no global backend or figure
    state is touched; `Software` metadata is dropped so identical data gives identical bytes.
    """
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = data.baseline
    ax.axhline(base.perplexity, color="grey", linestyle="--", linewidth=1,
               label=f"full precision: {format_ppl(base.perplexity)}")
    ax.scatter([base.size_bytes / 1e6], [base.perplexity], color="grey", marker="s", zorder=3)
    # the baseline is normally the largest file: label it leftwards so it stays inside the axes
    ax.annotate("full precision", (base.size_bytes / 1e6, base.perplexity), textcoords="offset points",
                xytext=(-4, 6), ha="right", fontsize=8, color="grey")
    for v in data.variants:
        x = v.size_bytes / 1e6
        ax.scatter([x], [v.perplexity], zorder=3)
        ax.annotate(v.branch, (x, v.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"{dataset_label(base.eval_dataset)} perplexity (lower is better)")
    ax.set_title(f"{data.model.name}: perplexity vs size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
