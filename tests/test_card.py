"""The model card: front matter, tables and snippets checked by parsing them back, and the plot PNG."""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest
import yaml
from markdown_it import MarkdownIt
from matplotlib import image as mpimg
from PIL import Image

from quantpress.config import CalibrationConfig, Method, QuantConfig
from quantpress.errors import ConfigError
from quantpress.prompts import TEMPLATES, VICUNA_SYSTEM
from quantpress.release.card import (
    CardData,
    code_fence,
    human_size,
    plot_perplexity_vs_size,
    render_card,
    table_cell,
)
from quantpress.release.recipe import ModelInfo
from quantpress.release.results import Baseline, VariantResult

FILES_HEADER = ["Branch", "Bits", "GS", "Act Order", "Damp %", "Levers", "GPTQ Dataset", "Seq Len", "Size", "ExLlama",
                "Marlin / vLLM", "Desc"]
QUALITY_HEADER = ["Branch", "Bits", "GS", "Act Order", "wikitext-2 perplexity", "Δ vs full precision",
                  "KL to full precision", "Top-1 agreement", "Size"]
SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "mlp.down_proj": (4096, 14336)}
NAME = 'Mistral 7B: "Instruct" it\'s v0.1'


def variant(branch: str, bits: int, gs: int, ppl: float, size: int, desc: str, **quant) -> VariantResult:
    calibration = CalibrationConfig(dataset="/data/my-corpus.txt" if bits == 3 else "wikitext2", nsamples=128,
                                    seqlen=2048, seed=0)
    quant = {"act_order": True, "damp_percent": 0.1, **quant}
    return VariantResult(branch, QuantConfig(bits=bits, group_size=gs, **quant),
                         calibration, desc, "quantized", size, ppl, 812.0, 95.0, "f" * 64)


@pytest.fixture
def data() -> CardData:
    model = ModelInfo(NAME, "Mistral AI", "mistralai/Mistral-7B-Instruct-v0.1", "apache-2.0",
                      prompt_template="vicuna", system_prompt="Be brief.", description="An instruct model.",
                      repo_id="acme/Mistral-7B-GPTQ")
    baseline = Baseline(10.0, "wikitext2", 2048, 163, 14_480_000_000, SHAPES)
    variants = (
        variant("main", 4, -1, 10.006, 4_160_000_000, "4-bit, no group size | smallest 4-bit."),
        variant("gptq-4bit-128g-actorder_True", 4, 128, 9.99, 4_240_000_000, "4-bit, 128g."),
        variant("gptq-3bit-128g-actorder_True", 3, 128, 10.75, 3_712_345, "3-bit, 128g."),
    )
    return CardData(model, baseline, variants, "perplexity-vs-size.png", "0.1.0")


def split_front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end]), card[end + len("\n---\n"):]


def table(card: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The GFM table whose header line starts with `header_start`: header cells and body rows."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # an escaped \| stays inside its cell
    return [p.strip().replace("\\|", "|") for p in parts]


def test_front_matter_parses_with_the_right_values(data):
    meta, _ = split_front_matter(render_card(data))
    assert meta["model_name"] == NAME  # colon and both quote kinds survive
    assert meta["base_model"] == "mistralai/Mistral-7B-Instruct-v0.1"
    assert meta["model_creator"] == "Mistral AI"
    assert meta["license"] == "apache-2.0"
    assert meta["quantized_by"] == "quantpress"
    assert meta["prompt_template"] == "Be brief. USER: {prompt} ASSISTANT:"
    assert meta["inference"] is False
    assert meta["tags"] == ["gptq", "quantpress"]


def test_front_matter_multiline_template(data):
    model = replace(data.model, prompt_template="chatml", system_prompt=None)
    meta, _ = split_front_matter(render_card(replace(data, model=model)))
    assert meta["prompt_template"] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                       "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", [None, "  Leading spaces,\ttabs, trailing spaces  \nand: 'quotes' \"too\"\n"])
def test_front_matter_round_trips_every_template(data, name, system):
    # multi-line templates are written as literal blocks; PyYAML must fall back to quoting
    # wherever a block could not hold the text exactly
    model = replace(data.model, prompt_template=name, system_prompt=system)
    meta, _ = split_front_matter(render_card(replace(data, model=model)))
    assert meta["prompt_template"] == TEMPLATES[name].render("{prompt}", system)


def test_provided_files_table_matches_the_results(data):
    header, rows = table(render_card(data), "| Branch | Bits | GS | Act Order | Damp %")
    assert header == FILES_HEADER
    assert len(rows) == len(data.variants)
    expected = [
        ["`main`", "4", "None", "Yes", "0.1", "—", "wikitext-2", "2048", "4.16 GB", "Yes", "Yes",
         "4-bit, no group size | smallest 4-bit."],
        ["`gptq-4bit-128g-actorder_True`", "4", "128", "Yes", "0.1", "—", "wikitext-2", "2048", "4.24 GB", "Yes", "Yes",
         "4-bit, 128g."],
        # a local calibration file shows by its name only; 3-bit fits neither ExLlama nor Marlin
        ["`gptq-3bit-128g-actorder_True`", "3", "128", "Yes", "0.1", "—", "my-corpus.txt", "2048", "3.71 MB", "No", "No",
         "3-bit, 128g."],
    ]
    assert rows == expected


def test_perplexity_table_deltas_come_from_the_numbers(data):
    header, rows = table(render_card(data), "| Branch | Bits | GS | Act Order | wikitext-2 perplexity")
    assert header == QUALITY_HEADER
    assert rows[0] == ["full precision", "—", "—", "—", "10.000", "—", "0", "100%", "14.48 GB"]
    base = data.baseline.perplexity
    for row, v in zip(rows[1:], data.variants, strict=True):
        assert row[0] == f"`{v.branch}`"
        assert float(row[4]) == pytest.approx(v.perplexity, abs=5e-4)
        assert row[5] == f"{(v.perplexity - base) / base * 100:+.2f}%"
        assert row[6:8] == ["—", "—"]  # records from before KL was measured
    assert [r[5] for r in rows[1:]] == ["+0.06%", "-0.10%", "+7.50%"]


def test_kl_and_top1_come_from_the_records(data):
    measured = replace(data.variants[0], kl_divergence=0.01234, top1=0.9876)
    _, rows = table(render_card(replace(data, variants=(measured,))), "| Branch | Bits | GS | Act Order | wikitext-2 perplexity")
    assert rows[1][6:8] == ["0.0123", "98.8%"]


def test_card_states_eval_and_calibration_protocol(data):
    card = render_card(data)
    assert "163 non-overlapping windows of 2048 tokens" in card
    assert "128 random windows of 2048 tokens from wikitext-2 (seed 0)" in card
    assert "128 random windows of 2048 tokens from my-corpus.txt (seed 0)" in card
    assert "sequential GPTQ" in card


def test_shared_calibration_is_explained(data):
    variants = (data.variants[0], replace(data.variants[1], hessian_inputs="full_precision"))
    card = render_card(replace(data, variants=variants))
    assert "`full_precision`" in card and "shared calibration" in card
    assert "`quantized`" in card


def test_unknown_hessian_mode_is_refused(data):
    odd = replace(data.variants[1], hessian_inputs="mystery")
    with pytest.raises(ConfigError, match="mystery"):
        render_card(replace(data, variants=(data.variants[0], odd)))


def test_html_has_the_tables_and_the_plot(data):
    _, body = split_front_matter(render_card(data))
    html = MarkdownIt("commonmark").enable("table").render(body)
    tables = re.findall(r"<table>(.*?)</table>", html, re.DOTALL)
    headers = [re.findall(r"<th>(.*?)</th>", t) for t in tables]
    assert FILES_HEADER in headers and QUALITY_HEADER in headers
    files = tables[headers.index(FILES_HEADER)]
    body_rows = re.findall(r"<tr>(.*?)</tr>", files.split("<tbody>")[1], re.DOTALL)
    assert len(body_rows) == 3
    assert all(len(re.findall(r"<td>", r)) == len(FILES_HEADER) for r in body_rows)  # the escaped | held
    assert '<img src="perplexity-vs-size.png" alt="Perplexity vs size"' in html


def test_compatibility_is_derived_per_branch(data):
    asym = variant("gptq-4bit-128g-actorder_True-asym", 4, 128, 10.01, 4_240_000_000, "asym", sym=False)
    header, rows = table(render_card(replace(data, variants=(*data.variants, asym))), "| Branch | Format")
    by_branch = {r[0].strip("`"): dict(zip(header, r, strict=True)) for r in rows}
    assert by_branch["main"]["vLLM"] == "Yes (gptq_marlin)"
    assert by_branch["gptq-3bit-128g-actorder_True"]["vLLM"] == "Yes (gptq)"
    assert by_branch["gptq-3bit-128g-actorder_True"]["ExLlama / ExLlamaV2"] == "No"
    assert by_branch["gptq-4bit-128g-actorder_True-asym"]["Format"] == "`gptq_v2`"
    assert by_branch["gptq-4bit-128g-actorder_True-asym"]["TGI"] == "No"
    assert by_branch["main"]["Format"] == "`gptq`"


def test_download_instructions_use_the_repo_and_a_branch(data):
    card = render_card(data)
    assert "`acme/Mistral-7B-GPTQ:gptq-4bit-128g-actorder_True`" in card
    assert "quantpress download acme/Mistral-7B-GPTQ:gptq-4bit-128g-actorder_True --local-dir Mistral-7B-GPTQ" in card
    assert "huggingface-cli download acme/Mistral-7B-GPTQ --revision gptq-4bit-128g-actorder_True" in card
    assert "git clone --single-branch --branch gptq-4bit-128g-actorder_True " \
           "https://huggingface.co/acme/Mistral-7B-GPTQ" in card
    assert "YOUR-ORG" not in card


@pytest.mark.parametrize("template", ["vicuna", "chatml", "alpaca", "llama-2-chat", "none"])
def test_snippets_are_valid_and_carry_the_exact_prompt(data, template):
    model = replace(data.model, prompt_template=template, system_prompt=None)
    card = render_card(replace(data, model=model))
    prompt = split_front_matter(card)[0]["prompt_template"].replace("{prompt}", "Tell me about AI")
    for block in re.findall(r"```python\n(.*?)```", card, re.DOTALL):
        tree = ast.parse(block)  # the template's quotes and newlines are escaped correctly
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert any(lit.replace("{prompt}", "Tell me about AI") == prompt for lit in literals)
    curl = re.search(r"```shell\n(curl .*?)```", card, re.DOTALL).group(1).replace("\\\n", " ")
    args = shlex.split(curl)
    body = json.loads(args[args.index("-d") + 1])
    assert body["inputs"] == prompt
    assert set(body["parameters"]) == {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"}


def test_renders_without_repo_id_or_system_prompt(data):
    model = replace(data.model, repo_id=None, system_prompt=None)
    card = render_card(replace(data, model=model))
    meta, _ = split_front_matter(card)
    assert meta["prompt_template"] == VICUNA_SYSTEM + " USER: {prompt} ASSISTANT:"
    placeholder = "YOUR-ORG/Mistral-7B-Instruct-it-s-v0.1-GPTQ"
    assert f"quantpress download {placeholder}:gptq-4bit-128g-actorder_True" in card
    assert f"Replace `{placeholder}`" in card


def test_base_model_only_for_hub_ids(data):
    hub_url = replace(data.model, original_model="https://huggingface.co/org/base")
    assert split_front_matter(render_card(replace(data, model=hub_url)))[0]["base_model"] == "org/base"
    other = replace(data.model, original_model="https://example.com/weights")
    assert "base_model" not in split_front_matter(render_card(replace(data, model=other)))[0]


def test_rtn_variant_has_no_calibration_columns(data):
    rtn = VariantResult("rtn-4bit-128g-actorder_False", QuantConfig(bits=4, group_size=128, method=Method.RTN),
                        CalibrationConfig(), "RTN baseline.", "quantized", 4_000_000_000, 10.5, 1.0, 1.0, "0" * 64)
    _, rows = table(render_card(replace(data, variants=(*data.variants, rtn))), "| Branch | Bits | GS | Act Order | Damp")
    assert rows[-1][4] == "n/a (RTN)" and rows[-1][6:8] == ["n/a (RTN)", "n/a"]


def test_quality_levers_are_named_on_the_card(data):
    tuned = variant("gptq-3bit-128g-actorder_False", 3, 128, 11.0, 2_000_000_000, "Tuned.", act_order=False,
                    group_aware=True,
                    mse=True, mse_weighted=True, damp_search=True)
    header, rows = table(render_card(replace(data, variants=(*data.variants, tuned))), "| Branch | Bits | GS")
    row = dict(zip(header, rows[-1]))
    assert row["Damp %"] == "per module"
    assert row["Levers"] == "group-aware order, weighted MSE range, damp search"
    assert dict(zip(header, rows[0]))["Levers"] == "—"


@pytest.mark.parametrize(("n", "text"), [(999, "999 B"), (1_500, "1.50 KB"), (3_712_345, "3.71 MB"),
                                         (4_160_000_000, "4.16 GB")])
def test_human_size(n, text):
    assert human_size(n) == text


def test_table_cell_and_code_fence():
    assert table_cell("a | b\nc") == "a \\| b c"
    assert code_fence("plain") == "```"
    assert code_fence("has ``` inside") == "````"


def test_plot_is_a_small_deterministic_png(data, tmp_path):
    backend = matplotlib.get_backend()
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    plot_perplexity_vs_size(data, first)
    plot_perplexity_vs_size(data, second)
    raw = first.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert raw == second.read_bytes()
    assert len(raw) < 100_000
    with Image.open(first) as img:
        img.load()
        assert img.format == "PNG" and img.size == (700, 450)
    assert mpimg.imread(str(first)).shape[:2] == (450, 700)
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_plot_file_name_is_what_the_card_links(data, tmp_path):
    renamed = replace(data, plot_file="plots/ppl.png")
    assert "![Perplexity vs size](plots/ppl.png)" in render_card(renamed)
    plot_perplexity_vs_size(renamed, Path(tmp_path / "ppl.png"))
    assert (tmp_path / "ppl.png").stat().st_size > 0


def test_delta_that_rounds_to_zero_has_no_sign():
    from quantpress.release.card import format_delta

    assert format_delta(119.243, 119.245) == "±0.00%"
    assert format_delta(119.353, 119.245) == "+0.09%"
    assert format_delta(110.064, 110.157) == "-0.08%"
