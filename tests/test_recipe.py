"""Recipes: the default set, YAML with defaults and overrides, and the errors a typo gets."""

from __future__ import annotations

import re

import pytest

from quantpress.config import RECOMMENDED_LEVERS, CalibrationConfig, QuantConfig, recommended
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
    # every branch carries the recommended levers: static act-order, weighted range search, damp search
    assert all(v.quant == recommended(bits=v.quant.bits, group_size=v.quant.group_size) for v in recipe.variants)
    assert all(v.quant.static_groups and v.quant.mse_weighted and v.quant.damp_search for v in recipe.variants)
    assert {v.calibration for v in recipe.variants} == {CalibrationConfig(dataset="wikitext2", seqlen=512)}


def test_recommended_fills_only_what_is_left_open():
    assert recommended() == QuantConfig(**RECOMMENDED_LEVERS)
    assert recommended(method="rtn") == QuantConfig(method="rtn")  # no Hessian, no levers
    assert recommended(group_aware=True) == QuantConfig(group_aware=True, mse=True, mse_weighted=True,
                                                        damp_search=True)
    assert recommended(mse=False) == QuantConfig(act_order=True, static_groups=True, damp_search=True)
    assert recommended(act_order=None, damp_search=False).damp_search is False
    with pytest.raises(ConfigError, match="static_groups"):
        recommended(method="signround", static_groups=False)  # SignRound needs contiguous groups


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
    assert main.quant == QuantConfig(bits=4, group_size=128, **RECOMMENDED_LEVERS)  # open settings: recommended
    assert main.calibration == CalibrationConfig(dataset="tinyshakespeare", nsamples=16, seqlen=512)
    assert second.branch == "gptq-3bit-32g-actorder_False"
    assert second.quant.damp_percent == 0.05 and second.calibration.seqlen == 128
    assert not second.quant.act_order and second.quant.static_groups  # an explicit choice wins, the rest stay
    assert third.branch == "gptq-3bit-32g-wiki" and third.calibration.dataset == "wikitext2"
    assert recipe.model.prompt_template == "vicuna"


@pytest.mark.parametrize("variants, message", [
    ([{"bits": 4}], "exactly one variant"),
    ([{"main": True, "bits": 4}, {"main": True, "bits": 3}], "exactly one variant"),
    ([{"main": True, "bits": 4}, {"bits": 3}, {"bits": 3, "nsamples": 8}], "both be published on branch"),
    ([{"main": True, "bits": 4, "grup_size": 32}], r"variants\[0\]\.grup_size: unknown key \(did you mean group_size\?\)"),
    ([{"main": True, "bits": 5}], r"variants\[0\]: bits must be one of"),
    ([{"main": True, "bits": 4}, {"bits": 3, "branch": "no spaces"}], "may use only letters"),
    ([], "at least one variant"),
])
def test_recipe_errors_name_the_problem(variants, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe({"model": INFO, "variants": variants}, seqlen_default=512)


def test_unknown_template_and_model_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown prompt template 'vicunya'"):
        parse_recipe({"model": {**INFO, "prompt_template": "vicunya"}, "variants": [{"main": True}]}, seqlen_default=8)
    with pytest.raises(ConfigError, match=r"^recipe: model\.creater: unknown key \(did you mean creator\?\)"):
        parse_recipe({"model": {**INFO, "creater": "x"}, "variants": [{"main": True}]}, seqlen_default=8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad, seqlen_default=8)


# --- finding 3: a recipe is checked against the typed objects before anything runs ---------------

MODEL_YAML = "model: {name: M, creator: c, original_model: org/m}\n"


@pytest.mark.parametrize("body, message", [
    # A quoted "false"/"no" is a string, and a non-empty string used to read as true.
    ("variants: [{main: true, act_order: 'false'}]", "variants[0].act_order: expected true or false, got 'false'"),
    ("variants: [{main: true, sym: 'no'}]", "variants[0].sym: expected true or false, got 'no'"),
    ("defaults: {act_order: 'true'}\nvariants: [{main: true}]",
     "defaults.act_order: expected true or false, got 'true'"),
    ("variants: 5", "variants: expected a list of variants, got 5"),
    ("variants: [{main: true}, {bits: 3}, {bits: 4, group_size: abc}]",
     "variants[2].group_size: expected an integer, got 'abc'"),
    ("variants: [{main: true, seqlen: null}]", "variants[0].seqlen: expected an integer, got null"),
    ("defaults: [1, 2]\nvariants: [{main: true}]", "defaults: expected a mapping, got a list [1, 2]"),
    ("variants: [{main: true, damp_percent: '0.1'}]", "variants[0].damp_percent: expected a number, got '0.1'"),
    ("variants: [{main: true, bits: 4.0}]", "variants[0].bits: expected an integer, got 4.0"),
    ("variants: [{main: true, bits: '4'}]", "variants[0].bits: expected an integer, got '4'"),
    ("variants: [{main: true, bits: true}]", "variants[0].bits: expected an integer, got true"),
    ("variants: [{main: true, nsamples: 1.5}]", "variants[0].nsamples: expected an integer, got 1.5"),
    # an int is a number (then range-checked by QuantConfig), a bool is not
    ("variants: [{main: true, damp_percent: 1}]", "variants[0]: damp_percent must be in (0, 1), got 1.0"),
    ("variants: [{main: true, damp_percent: false}]", "variants[0].damp_percent: expected a number, got false"),
    ("variants: [{main: true, method: awq}]", "variants[0].method: expected one of 'gptq', 'rtn', 'signround', got 'awq'"),
    ("variants: [{main: 'yes'}]", "variants[0].main: expected true or false, got 'yes'"),
    ("variants: [{main: true, desc: 5}]", "variants[0].desc: expected a string, got 5"),
    ("variants: [true]", "variants[0]: expected a mapping, got true"),
    ("variants: [{main: true}]\nvarients: []", "varients: unknown key (did you mean variants?)"),
    ("defaults: {main: true}\nvariants: [{bits: 4}]", "defaults.main: unknown key"),
])
def test_type_confused_recipes_name_file_and_key(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(MODEL_YAML + body)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, seqlen_default=512)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("model, message", [
    ("{name: M, creator: c, original_model: org/m, license: 3}", "model.license: expected a string, got 3"),
    ("{name: M, creator: c}", "model: missing original_model"),
    ("[M]", "model: expected a mapping, got a list ['M']"),
    ("{name: M, creator: c, original_model: org/m, repo_id: [a]}", "model.repo_id: expected a string or null"),
])
def test_model_section_is_typed_too(tmp_path, model, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {model}\nvariants: [{{main: true}}]\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        load_recipe(path, seqlen_default=512)


def test_yaml_bools_ints_and_numbers_are_taken_as_written(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(MODEL_YAML + """
defaults: {act_order: no, sym: false, damp_percent: 0.05}
variants:
  - {main: true, bits: 4, group_size: 32, static_groups: yes}
  - {bits: 8, group_size: -1, method: rtn, damp_percent: 0.5}
""")
    main, rtn = load_recipe(path, seqlen_default=512).variants
    assert main.quant == QuantConfig(bits=4, group_size=32, act_order=False, sym=False, damp_percent=0.05,
                                     static_groups=True, mse=True, mse_weighted=True, damp_search=True)
    assert rtn.quant.method.value == "rtn" and rtn.quant.damp_percent == 0.5
    assert rtn.branch == "rtn-8bit--1g-actorder_False-asym"


def test_an_unreadable_recipe_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml", seqlen_default=8)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError,
                       match=r"empty\.yaml: a recipe is a mapping with `model:` and `variants:`, got null"):
        load_recipe(empty, seqlen_default=8)


# --- finding 6: branch names are checked with git's own rule when the recipe is read ------------

@pytest.mark.parametrize("branch", ["..", ".", "x.lock", ".hidden", "a..b", "-dash", "HEAD"])
def test_branch_names_git_refuses_fail_at_load(branch):
    variants = [{"main": True}, {"bits": 3, "branch": branch}]
    with pytest.raises(ConfigError, match=r"^recipe: variants\[1\]\.branch: .*not one git accepts"):
        parse_recipe({"model": INFO, "variants": variants}, seqlen_default=512)
