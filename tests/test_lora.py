"""merge_lora: a real peft LoRA adapter merged into the bundled Llama, checked against W + (alpha/r)·B·A."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantpress
from quantpress.api import bundled_model_dir
from quantpress.errors import CheckpointError, ConfigError, OutputExistsError
from quantpress.formats.hf_folder import (
    ModelFolder,
    atomic_save_tensors,
    atomic_write_json,
    copy_side_files,
)
from quantpress.release.lora import merge_lora

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTER_FILE = "adapter_model.safetensors"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    # Everything is local: a Hub request would fail the test instead of silently downloading.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def _float32_copy(src: Path, dst: Path) -> Path:
    """The bundled model upcast to float32 (exactly), so merged and un-merged logits can be
    compared at float32 precision instead of bf16 rounding."""
    folder = ModelFolder(src)
    tensors = {name: t.float() for name, t in folder.read(folder.names()).items()}
    atomic_save_tensors(dst / WEIGHTS, tensors, {"format": "pt"})
    atomic_write_json(dst / "config.json", {**folder.config, "dtype": "float32", "torch_dtype": "float32"})
    copy_side_files(src, dst)
    return dst


def _make_adapter(base: Path, out: Path, seed: int, targets: list[str] = TARGETS):
    """A real peft LoRA adapter with random non-zero lora_B (peft initialises B to zero, which
    would make the merge a no-op); returns the in-memory, un-merged peft model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # lora_A's kaiming init draws from the global generator
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.fixture(scope="module")
def base_f32(tmp_path_factory) -> Path:
    return _float32_copy(bundled_model_dir(), tmp_path_factory.mktemp("base-f32"))


@pytest.fixture(scope="module")
def adapter(base_f32, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "my-adapter"
    return path, _make_adapter(base_f32, path, seed=0)


@pytest.fixture(scope="module")
def merged(base_f32, adapter, tmp_path_factory) -> Path:
    return merge_lora(base_f32, adapter[0], tmp_path_factory.mktemp("out") / "merged")


def _expected_merge(base: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """W + (lora_alpha / r) · B @ A per targeted module, in float32, from the saved files."""
    base_tensors = load_file(base / WEIGHTS)
    lora = load_file(adapter_dir / ADAPTER_FILE)
    expected = {}
    for key, A in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = lora[key.replace("lora_A", "lora_B")]
            W = base_tensors[f"{module}.weight"].float()
            expected[f"{module}.weight"] = W + (ALPHA / R) * (B.float() @ A.float())
    return expected


def _no_partial(out: Path) -> bool:
    return not out.with_name(out.name + ".partial").exists()


# --- the merge itself ----------------------------------------------------------------------------

def test_targeted_weights_are_w_plus_scaled_ba(base_f32, adapter, merged):
    expected = _expected_merge(base_f32, adapter[0])
    assert len(expected) == 4 * len(TARGETS)  # every decoder layer, every target
    out = load_file(merged / WEIGHTS)
    for name, want in expected.items():
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(out[name], load_file(base_f32 / WEIGHTS)[name]), f"{name} unchanged"
    assert _no_partial(merged)


def test_untouched_weights_are_bit_identical(base_f32, adapter, merged):
    base, out = load_file(base_f32 / WEIGHTS), load_file(merged / WEIGHTS)
    assert out.keys() == base.keys()  # same names; the tied lm_head stays out of the file
    targeted = _expected_merge(base_f32, adapter[0]).keys()
    for name in base.keys() - targeted:
        assert out[name].dtype == base[name].dtype and torch.equal(out[name], base[name]), name


def test_merged_logits_equal_the_unmerged_peft_model(base_f32, adapter, merged):
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    loaded = quantpress.load(merged)
    with torch.inference_mode():
        got = loaded.model(input_ids=ids).logits
        want = adapter[1](input_ids=ids).logits
        base = quantpress.load(base_f32, tokenizer=False).model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapter really changed the model


def test_folder_keeps_base_config_tying_and_side_files(base_f32, merged):
    config = json.loads((merged / "config.json").read_text())
    assert config == json.loads((base_f32 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (merged / name).read_bytes() == (base_f32 / name).read_bytes(), name
    loaded = quantpress.load(merged)
    assert loaded.tokenizer is not None
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_record_names_the_adapter_without_local_paths(base_f32, adapter, merged):
    text = (merged / "merge_lora.json").read_text()
    record = json.loads(text)
    assert record["adapter"] == "my-adapter" and record["base"] == base_f32.name
    assert record["r"] == R and record["lora_alpha"] == ALPHA and record["target_modules"] == sorted(TARGETS)
    # peft wrote the local base folder's absolute path into adapter_config.json; only its name is published
    adapter_config = json.loads((adapter[0] / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]).is_absolute()
    assert record["base_model_name_or_path"] == base_f32.name
    assert "/" not in text and len(record["fingerprint"]) == 64


def test_bfloat16_base_stays_bfloat16_and_tied(adapter, tmp_path):
    base = bundled_model_dir()  # bf16 as shipped; read only
    out = merge_lora(base, adapter[0], tmp_path / "merged-bf16")
    merged, original = load_file(out / WEIGHTS), load_file(base / WEIGHTS)
    expected = _expected_merge(base, adapter[0])
    assert merged.keys() == original.keys()
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16, name
        if name in expected:  # within bf16 rounding of the exact float32 sum
            torch.testing.assert_close(t.float(), expected[name], rtol=2**-8, atol=1e-6, msg=name)
        else:
            assert torch.equal(t, original[name]), name
    loaded = quantpress.load(out)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


# --- reuse -----------------------------------------------------------------------------------

def test_same_inputs_reuse_the_merged_folder(base_f32, adapter, merged):
    before = (merged / WEIGHTS).stat().st_mtime_ns
    record_before = (merged / "merge_lora.json").stat().st_mtime_ns
    assert merge_lora(base_f32, adapter[0], merged) == merged
    assert (merged / WEIGHTS).stat().st_mtime_ns == before
    assert (merged / "merge_lora.json").stat().st_mtime_ns == record_before


def test_a_changed_adapter_redoes_the_merge(base_f32, adapter, tmp_path):
    adapter_dir = shutil.copytree(adapter[0], tmp_path / "my-adapter")
    out = merge_lora(base_f32, adapter_dir, tmp_path / "merged")
    first_mtime = (out / WEIGHTS).stat().st_mtime_ns
    first_fingerprint = json.loads((out / "merge_lora.json").read_text())["fingerprint"]

    lora = load_file(adapter_dir / ADAPTER_FILE)
    g = torch.Generator().manual_seed(5)
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v for k, v in lora.items()}
    save_file(lora, adapter_dir / ADAPTER_FILE, {"format": "pt"})

    assert merge_lora(base_f32, adapter_dir, out) == out
    assert (out / WEIGHTS).stat().st_mtime_ns != first_mtime
    assert json.loads((out / "merge_lora.json").read_text())["fingerprint"] != first_fingerprint
    got = load_file(out / WEIGHTS)
    for name, want in _expected_merge(base_f32, adapter_dir).items():
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7, msg=name)
    assert _no_partial(out) and not out.with_name(out.name + ".stale").exists()


def test_pickle_adapter_weights_merge_the_same(base_f32, adapter, merged, tmp_path):
    # Older adapters (the original Guanaco ones among them) ship adapter_model.bin
    adapter_dir = shutil.copytree(adapter[0], tmp_path / "my-adapter")
    torch.save(load_file(adapter_dir / ADAPTER_FILE), adapter_dir / "adapter_model.bin")
    (adapter_dir / ADAPTER_FILE).unlink()
    out = merge_lora(base_f32, adapter_dir, tmp_path / "merged")
    got, want = load_file(out / WEIGHTS), load_file(merged / WEIGHTS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_foreign_output_folder_is_refused(base_f32, adapter, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="merge_lora.json"):
        merge_lora(base_f32, adapter[0], out)
    assert (out / "notes.txt").read_text() == "keep me"


# --- invalid inputs ------------------------------------------------------------------------------

def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _edit_tensors(edit_one: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        lora = load_file(adapter_dir / ADAPTER_FILE)
        edited = {}
        for key, t in lora.items():
            edited.update(edit_one(key, t))
        save_file(edited, adapter_dir / ADAPTER_FILE, {"format": "pt"})
    return edit


BROKEN_ADAPTERS = {
    "no adapter_config.json": (lambda d: (d / "adapter_config.json").unlink(),
                               CheckpointError, "no adapter_config.json"),
    "no weights": (lambda d: (d / ADAPTER_FILE).unlink(), CheckpointError, "no adapter weights"),
    "not LoRA": (_edit_config(peft_type="IA3"), ConfigError, "IA3 adapter; only LORA"),
    "targets not in base": (_edit_config(target_modules=["qkv_proj"]), ConfigError, "qkv_proj"),
    "other hidden size": (_edit_tensors(lambda k, t: {k: t[:, :128].contiguous() if "lora_A" in k else t}),
                          CheckpointError,
                          r"\[4, 128\] but model\.layers\.0\.\S+ has \d+ input features .*another hidden size"),
    "more layers than base": (_edit_tensors(lambda k, t: {k.replace("layers.3.", "layers.7."): t}),
                              CheckpointError, r"model\.layers\.7\..* which the base model does not have"),
    "fewer layers than base": (_edit_tensors(lambda k, t: {} if "layers.3." in k else {k: t}),
                               CheckpointError, r"targets \['model\.layers\.3\..*holds no weights"),
}


@pytest.mark.parametrize("case", BROKEN_ADAPTERS, ids=list(BROKEN_ADAPTERS))
def test_broken_adapters_are_named(case, base_f32, adapter, tmp_path):
    breaks, error, message = BROKEN_ADAPTERS[case]
    adapter_dir = shutil.copytree(adapter[0], tmp_path / "adapter")
    breaks(adapter_dir)
    out = tmp_path / "merged"
    with pytest.raises(error, match=message):
        merge_lora(base_f32, adapter_dir, out)
    assert not out.exists() and _no_partial(out)


def test_missing_adapter_folder(base_f32, tmp_path):
    with pytest.raises(CheckpointError, match="adapter folder not found"):
        merge_lora(base_f32, tmp_path / "nope", tmp_path / "merged")


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft itself warns that such an adapter is trouble to merge
def test_adapter_on_tied_embeddings_is_refused(tmp_path):
    base = bundled_model_dir()  # tie_word_embeddings: true
    adapter_dir = tmp_path / "lm-head-adapter"
    _make_adapter(base, adapter_dir, seed=3, targets=["lm_head"])
    with pytest.raises(ConfigError, match="embeddings are tied"):
        merge_lora(base, adapter_dir, tmp_path / "merged")


def test_quantized_base_is_refused(base_f32, adapter, tmp_path):
    base = tmp_path / "gptq"
    base.mkdir()
    (base / WEIGHTS).symlink_to(base_f32 / WEIGHTS)
    config = json.loads((base_f32 / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match="quantized model"):
        merge_lora(base, adapter[0], tmp_path / "merged")


def test_missing_peft_says_how_to_install_it(base_f32, adapter, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ConfigError, match=r'pip install "quantpress\[lora\]"'):
        merge_lora(base_f32, adapter[0], tmp_path / "merged")


# --- finding 2: the merge writes over nothing it did not write, and runs no folder code ----------

def test_a_partial_folder_that_is_not_ours_is_kept(base_f32, adapter, tmp_path):
    out = tmp_path / "merged"
    mine = tmp_path / "merged.partial"  # a name the staging uses, but someone else's folder
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not made by quantpress"):
        merge_lora(base_f32, adapter[0], out)
    assert (mine / "thesis.tex").read_text() == "keep me" and not out.exists()


def test_an_earlier_merge_holding_someone_elses_file_is_not_replaced(base_f32, adapter, tmp_path):
    adapter_dir = shutil.copytree(adapter[0], tmp_path / "my-adapter")
    out = merge_lora(base_f32, adapter_dir, tmp_path / "merged")
    (out / "my-eval-notes.md").write_text("keep me")
    lora = load_file(adapter_dir / ADAPTER_FILE)
    save_file({k: v * 2 for k, v in lora.items()}, adapter_dir / ADAPTER_FILE, {"format": "pt"})
    with pytest.raises(OutputExistsError, match="my-eval-notes.md"):
        merge_lora(base_f32, adapter_dir, out)
    assert (out / "my-eval-notes.md").read_text() == "keep me" and _no_partial(out)


@pytest.mark.parametrize("where", ["base", "inside base", "adapter", "contains adapter"])
def test_an_output_overlapping_an_input_is_refused(base_f32, adapter, tmp_path, where):
    adapter_dir = shutil.copytree(adapter[0], tmp_path / "adapters" / "a")
    out = {"base": base_f32, "inside base": base_f32 / "merged", "adapter": adapter_dir,
           "contains adapter": tmp_path / "adapters"}[where]
    before = sorted(p.name for p in base_f32.iterdir())
    with pytest.raises(ConfigError, match="choose"):
        merge_lora(base_f32, adapter_dir, out)
    assert sorted(p.name for p in base_f32.iterdir()) == before
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(p.name for p in adapter[0].iterdir())


def test_a_base_that_needs_its_own_code_is_refused(base_f32, adapter, tmp_path):
    base = tmp_path / "remote-code-base"
    base.mkdir()
    (base / WEIGHTS).symlink_to(base_f32 / WEIGHTS)
    copy_side_files(base_f32, base)
    config = json.loads((base_f32 / "config.json").read_text())
    auto_map = {"AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    (base / "evil.py").write_text("raise SystemExit('folder code ran')\n")
    with pytest.raises(CheckpointError, match=r"auto_map.*AutoModelForCausalLM: evil\.EvilModel"):
        merge_lora(base, adapter[0], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
