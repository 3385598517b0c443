"""Recipes: the default set, YAML with defaults and overrides, and the errors a typo gets."""

from __future__ import annotations

import pytest

from quantpress.config import CalibrationConfig, QuantConfig
from quantpress.errors import ConfigError
from quantpress.release.recipe import ModelInfo, default_recipe, load_recipe, parse_recipe

INFO = {"name": "M", "creator": "c", "original_model": "org/m"}


def test_default_recipe_is_thebloke_set():
    recipe = default_recipe(ModelInfo(**INFO), seqlen=512)
    assert [v.branch for v in recipe.variants] == [
        "main", "gptq-4bit-128g-actorder_True", "gptq-4bit-32g-actorder_True", "gptq-3bit-128g-actorder_True",
        "gptq-3bit-32g-actorder_True", "gptq-8bit--1g-actorder_True", "gptq-8bit-128g-actorder_True"]
    main = recipe.main
    assert (main.quant.bits, main.quant.group_size, main.quant.act_order) == (4, -1, True)
    assert all(v.quant.act_order and v.quant.damp_percent == 0.1 for v in recipe.variants)
    assert {v.calibration for v in recipe.variants} == {CalibrationConfig(dataset="wikitext2", seqlen=512)}


def test_yaml_defaults_apply_and_variants_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("""
model: {name: M, creator: c, original_model: org/m, prompt_template: vicuna}
defaults: {act_order: true, dataset: tinyshakespeare, nsamples: 16}
variants:
  - {main: true, bits: 4, group_size: 128, desc: "rec"}
  - {bits: 3, group_size: 32, act_order: false, seqlen: 128, damp_percent: 0.05}
  - {bits: 3, group_size: 32, act_order: false, seqlen: 128, damp_percent: 0.05, dataset: wikitext2, branch: gptq-3bit-32g-wiki}
""")
    recipe = load_recipe(path, seqlen_default=512)
    main, second, third = recipe.variants
    assert main.branch == "main" and main.description == "rec"
    assert main.quant == QuantConfig(bits=4, group_size=128, act_order=True)
    assert main.calibration == CalibrationConfig(dataset="tinyshakespeare", nsamples=16, seqlen=512)
    assert second.branch == "gptq-3bit-32g-actorder_False"
    assert second.quant.damp_percent == 0.05 and second.calibration.seqlen == 128
    assert third.branch == "gptq-3bit-32g-wiki" and third.calibration.dataset == "wikitext2"
    assert recipe.model.prompt_template == "vicuna"


@pytest.mark.parametrize("variants, message", [
    ([{"bits": 4}], "exactly one variant"),
    ([{"main": True, "bits": 4}, {"main": True, "bits": 3}], "exactly one variant"),
    ([{"main": True, "bits": 4}, {"bits": 3}, {"bits": 3, "nsamples": 8}], "both be published on branch"),
    ([{"main": True, "bits": 4, "grup_size": 32}], "unknown keys"),
    ([{"main": True, "bits": 5}], "bits must be one of"),
    ([{"main": True, "bits": 4}, {"bits": 3, "branch": "no spaces"}], "must match"),
    ([], "at least one variant"),
])
def test_recipe_errors_name_the_problem(variants, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe({"model": INFO, "variants": variants}, seqlen_default=512)


def test_unknown_template_and_model_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown prompt template 'vicunya'"):
        parse_recipe({"model": {**INFO, "prompt_template": "vicunya"}, "variants": [{"main": True}]}, seqlen_default=8)
    with pytest.raises(ConfigError, match="recipe `model:`"):
        parse_recipe({"model": {**INFO, "creater": "x"}, "variants": [{"main": True}]}, seqlen_default=8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad, seqlen_default=8)
