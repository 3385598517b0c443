"""Interoperability with GPTQModel, both directions.

Always run (seconds, no peer needed): the committed GPTQModel-written fixtures under
tests/fixtures/gptqmodel/ load with `quantpress.load`, their logits match GPTQModel's own
(transformers + GPTQModel `gptq_torch`) logits, and quantpress's dequantized weights equal an
independent unpacker written here from the spec (A2-A4), bit for bit.

`@pytest.mark.peer` (needs QUANTPRESS_PEER_GPTQMODEL_PYTHON = a GPTQModel venv's python): GPTQModel
regenerates a fixture identically, and quantpress-written checkpoints load in transformers +
GPTQModel with the logits quantpress's loader gives. The peer runs only as a subprocess.

Tolerances, from measurement (tiny models of tests/peers/tiny_models.py, |logits| <= ~12):
- GPTQModel's TorchLinear computes `scales[g_idx] * (q - z)` in the dtype of `scales`, which is
  fp16, and only then casts to the fp32 activations. quantpress dequantizes exactly in fp32. The
  fp16 rounding of each product (relative error <= 2^-11) moves the logits by at most 0.0185 over
  all fixtures (8-bit worst, 2-bit exactly 0 because q - z in {-2..1} makes every product exact).
  LOGIT_ATOL = 0.05 covers that with margin, while every decoding bug we tried moves the logits
  by > 3 (zero off by one, i.e. v1 read as v2: 3.3 at 8 bits, 14-17 at 2-4 bits; ignoring an
  act-order g_idx: 12-15): see test_tolerance_separates_fp16_rounding_from_decoding_bugs.
- Emulating that fp16 dequant in the independent decoder reproduces GPTQModel's logits exactly
  (max diff 0.0 here). EXACT_ATOL = 1e-4 only allows for a different CPU's fp32 matmul
  summation order; it is what proves the 0.05 above is fp16 rounding and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

import quantpress
from peers import regenerate_fixtures as regen
from peers import tiny_models
from quantpress.config import CalibrationConfig, QuantConfig, recommended
from quantpress.runtime.kernels import int4_layout
from quantpress.runtime.qlinear import QuantLinear

LOGIT_ATOL = 0.05  # fp32 dequant (quantpress) vs GPTQModel's fp16 dequant; see module docstring
EXACT_ATOL = 1e-4  # same arithmetic, only matmul summation order may differ across CPUs
FIXTURE_BUDGET_BYTES = 2_200_000  # keep the committed fixtures small (~1.7 MB today)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")

# Sym zero points are the constant 2^(b-1) (spec A4): the packed v1 (zero - 1) words per bit width.
SYM_V1_QZERO_WORDS = {
    2: [0x55555555],
    3: [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D],
    4: [0x77777777],
    8: [0x7F7F7F7F],
}

needs_peer = pytest.mark.skipif(
    regen.peer_python() is None,
    reason=f"set {regen.PEER_ENV_VAR} to the python of a GPTQModel 7.7 venv "
           "(recipe in tests/fixtures/gptqmodel/FIXTURE.md)",
)


# ------------------------------------------------------------------------------------------------
# Independent GPTQ decoder (spec A2-A4). Deliberately shares no code with quantpress: it reads the
# packed words as one LSB-first bitstream, which covers 2/3/4/8 bits without per-width cases.


def unpack_rows(words: Tensor, bits: int, count: int) -> Tensor:
    """Values packed along dim 0 of int32 `words` [R, C] -> int64 [count, C]."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # reinterpret the signed int32 as the stored uint32
    rows, cols = w.shape
    stream = (w[:, None, :] >> torch.arange(32)[None, :, None]) & 1  # bit p%32 of word p//32
    stream = stream.reshape(rows * 32, cols)[: count * bits]
    return (stream.reshape(count, bits, cols) << torch.arange(bits)[None, :, None]).sum(1)


@dataclass(frozen=True)
class DecodedLinear:
    q: Tensor  # [K, N] int64 in [0, 2^bits)
    zeros: Tensor  # [G, N] int64, the true zero point (v1's stored zero-1 already undone)
    scales: Tensor  # [G, N] float16
    g_idx: Tensor  # [K] int64

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[N, K] weight. float32 is exact; float16 mimics GPTQModel's TorchLinear rounding."""
        diff = self.q - self.zeros[self.g_idx]  # [K, N]
        if dtype == torch.float16:
            w = self.scales[self.g_idx] * diff.to(torch.float16)
        else:
            w = self.scales.float()[self.g_idx] * diff.float()
        return w.float().t().contiguous()


def decode_linear(tensors: dict[str, Tensor], prefix: str, bits: int, v2: bool) -> DecodedLinear:
    scales = tensors[f"{prefix}.scales"]
    g_idx = tensors[f"{prefix}.g_idx"].long()
    k, n = g_idx.numel(), scales.shape[1]
    q = unpack_rows(tensors[f"{prefix}.qweight"], bits, k)
    stored = unpack_rows(tensors[f"{prefix}.qzeros"].t().contiguous(), bits, n).t()  # packed along N
    return DecodedLinear(q, stored if v2 else stored + 1, scales, g_idx)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, Tensor]
    qconfig: dict  # config.json["quantization_config"]

    @property
    def bits(self) -> int:
        return int(self.qconfig["bits"])

    @property
    def is_v2(self) -> bool:
        return (self.qconfig.get("checkpoint_format") or self.qconfig.get("format")) == "gptq_v2"

    @property
    def quantized_prefixes(self) -> list[str]:
        return sorted(k[: -len(".qweight")] for k in self.tensors if k.endswith(".qweight"))

    def decode(self, prefix: str, *, v2: bool | None = None) -> DecodedLinear:
        return decode_linear(self.tensors, prefix, self.bits, self.is_v2 if v2 is None else v2)


def read_checkpoint(path: Path) -> Checkpoint:
    config = json.loads((path / "config.json").read_text())
    tensors: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return Checkpoint(path, tensors, config["quantization_config"])


def dense_reference(ckpt: Checkpoint, *, dequant_dtype=torch.float32, v2: bool | None = None):
    """A plain transformers fp32 model holding the independently dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in ckpt.tensors.items() if k.rpartition(".")[2] not in QUANT_SUFFIXES}
    for prefix in ckpt.quantized_prefixes:
        state[f"{prefix}.weight"] = ckpt.decode(prefix, v2=v2).dequantize(dequant_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@torch.inference_mode()
def logits_of(model: torch.nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def max_abs(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Committed fixtures


@dataclass(frozen=True)
class Fixture:
    spec: regen.FixtureSpec
    ckpt: Checkpoint
    input_ids: Tensor
    logits: Tensor  # GPTQModel's, through transformers


def fixture_from(root: Path) -> Fixture:
    """A fixture folder laid out as regenerate_fixtures.py writes it; its name picks the spec."""
    return Fixture(
        regen.FIXTURES_BY_NAME[root.name],
        read_checkpoint(root / regen.CHECKPOINT_SUBDIR),
        load_file(str(root / "input_ids.safetensors"))["input_ids"],
        load_file(str(root / "logits.safetensors"))["logits"],
    )


@lru_cache(maxsize=None)
def fixture(name: str) -> Fixture:
    return fixture_from(regen.FIXTURES_DIR / name)


@lru_cache(maxsize=None)
def quantpress_loaded(path: Path) -> quantpress.LoadedModel:
    """Exact dequantization: these tests check how the files are read (the bf16 decode kernels
    are checked against this path in test_kernels.py)."""
    return quantpress.load(path, dtype=torch.float32, exact=True)


FIXTURE_NAMES = [f.name for f in regen.FIXTURES]


def test_fixture_set_is_complete_and_small() -> None:
    for name in FIXTURE_NAMES:
        root = regen.FIXTURES_DIR / name
        for file in ("FIXTURE.md", "input_ids.safetensors", "logits.safetensors"):
            assert (root / file).is_file(), f"{root / file} missing: run tests/peers/regenerate_fixtures.py"
        for file in regen.KEPT_FILES:
            assert (root / regen.CHECKPOINT_SUBDIR / file).is_file(), f"{name}: {file} missing"
    total = sum(p.stat().st_size for p in regen.FIXTURES_DIR.rglob("*") if p.is_file())
    assert total < FIXTURE_BUDGET_BYTES, f"fixtures grew to {total} bytes"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_exercises_its_settings(name: str) -> None:
    """Guards the fixtures themselves: a GPTQModel upgrade that silently dropped act-order or
    wrote another format would otherwise leave these tests green while covering less."""
    fx = fixture(name)
    spec, ckpt = fx.spec, fx.ckpt
    qc = ckpt.qconfig
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (
        spec.bits, spec.group_size, spec.desc_act, spec.sym)
    assert qc["checkpoint_format"] == spec.fmt
    assert len(ckpt.quantized_prefixes) == 7 * tiny_models.SPECS[spec.arch].layers
    maxq = 2**spec.bits - 1
    for prefix in ckpt.quantized_prefixes:
        layer = ckpt.decode(prefix)
        k = layer.g_idx.numel()
        gs = k if spec.group_size == -1 else spec.group_size
        natural = torch.arange(k) // gs
        if spec.desc_act and spec.group_size != -1:
            # act-order: a permutation of the natural grouping, each group exactly gs channels
            assert not torch.equal(layer.g_idx, natural), f"{prefix}: g_idx is trivial"
            assert torch.equal(layer.g_idx.sort().values, natural)
        else:
            assert torch.equal(layer.g_idx, natural), prefix
        assert int(layer.q.min()) >= 0 and int(layer.q.max()) <= maxq
        if spec.sym:
            words = ckpt.tensors[f"{prefix}.qzeros"].to(torch.int64) & 0xFFFFFFFF
            expected = torch.tensor(SYM_V1_QZERO_WORDS[spec.bits]).repeat(words.shape[1] // len(
                SYM_V1_QZERO_WORDS[spec.bits]))
            assert (words == expected).all(), f"{prefix}: sym zeros are not 2^(b-1)"
        else:
            assert int(layer.zeros.min()) >= 0 and int(layer.zeros.max()) <= maxq
            assert layer.zeros.unique().numel() > 4, f"{prefix}: asym zeros look constant"
    if spec.arch == "qwen2":
        assert ckpt.tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_independent_decoder_reproduces_gptqmodel_logits(name: str) -> None:
    """Decoding with fp16 products, as TorchLinear does, gives GPTQModel's logits exactly: so we
    know what GPTQModel computes, and LOGIT_ATOL below only absorbs that fp16 rounding."""
    fx = fixture(name)
    emulated = logits_of(dense_reference(fx.ckpt, dequant_dtype=torch.float16), fx.input_ids)
    assert max_abs(emulated, fx.logits) <= EXACT_ATOL


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_quantpress_load_matches_gptqmodel_logits(name: str) -> None:
    fx = fixture(name)
    loaded = quantpress_loaded(fx.ckpt.path)
    info = loaded.format_info
    assert info is not None
    assert (info.bits, info.group_size, info.desc_act, info.sym) == (
        fx.spec.bits, fx.spec.group_size, fx.spec.desc_act, fx.spec.sym)
    assert info.checkpoint_format.value == fx.spec.fmt
    assert loaded.tokenizer is not None  # GPTQModel re-saves the source tokenizer beside the weights

    ours = logits_of(loaded.model, fx.input_ids)
    assert max_abs(ours, fx.logits) <= LOGIT_ATOL
    # Against the independent exact fp32 decode the only freedom is matmul summation order.
    assert max_abs(ours, logits_of(dense_reference(fx.ckpt), fx.input_ids)) <= EXACT_ATOL


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@torch.inference_mode()
def test_quantpress_dequant_is_bit_exact(name: str) -> None:
    """Each quantized module, run on the identity, returns W^T (+ bias) bit-identical to the
    independent decode: x @ W^T with x = I is exact, so this reads the runtime weight without
    relying on quantpress internals. Unquantized tensors must come through unchanged."""
    fx = fixture(name)
    model = quantpress_loaded(fx.ckpt.path).model
    for prefix in fx.ckpt.quantized_prefixes:
        module = model.get_submodule(prefix)
        expected = fx.ckpt.decode(prefix).dequantize(torch.float32).t()  # [K, N]
        bias = fx.ckpt.tensors.get(f"{prefix}.bias")
        if bias is not None:
            expected = expected + bias.float()
        got = module(torch.eye(expected.shape[0], dtype=torch.float32))
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), f"{prefix}: max diff {max_abs(got, expected)}"
    state = model.state_dict()
    for key, value in fx.ckpt.tensors.items():
        if key.rpartition(".")[2] in QUANT_SUFFIXES or key.rpartition(".")[0] in fx.ckpt.quantized_prefixes:
            continue
        assert torch.equal(state[key].float(), value.float()), key


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@torch.inference_mode()
def test_every_fixture_runs_on_the_packed_cpu_kernels(name: str) -> None:
    """The default load (no `exact`) packs every layer for this CPU's int kernels, whoever wrote
    the file (v1 or v2 zeros, act-order, 2-8 bits), and decode-sized inputs agree with the
    independent exact decode within the bf16 kernels' error."""
    if int4_layout() is None:
        pytest.skip("torch's CPU int4 kernel layout is unknown here")
    fx = fixture(name)
    model = quantpress.load(fx.ckpt.path, dtype=torch.float32).model
    kinds = {type(m.kernel).__name__ for m in model.modules() if isinstance(m, QuantLinear)}
    per_channel_8bit = fx.spec.bits == 8 and fx.spec.group_size == -1
    assert kinds == {"Int8Kernel" if per_channel_8bit else "TiledKernel" if fx.spec.bits == 8 else "Int4Kernel"}
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for prefix in fx.ckpt.quantized_prefixes:
        module = model.get_submodule(prefix)
        w = fx.ckpt.decode(prefix).dequantize(torch.float32).double()  # [N, K]
        xs = x if x.shape[1] == w.shape[1] else torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
        bias = fx.ckpt.tensors.get(f"{prefix}.bias")
        expected = xs.double() @ w.t() + (0 if bias is None else bias.double())
        rel = ((module(xs).double() - expected).norm() / expected.norm()).item()
        assert rel < 1e-2, f"{prefix}: relative error {rel}"
    fast = logits_of(model, fx.input_ids)
    exact = logits_of(quantpress_loaded(fx.ckpt.path).model, fx.input_ids)
    assert max_abs(fast, exact) < 0.05 * exact.abs().max()


def test_tolerance_separates_fp16_rounding_from_decoding_bugs() -> None:
    """Negative control for LOGIT_ATOL: on the 8-bit fixture (smallest zero step of all) reading
    v1 zeros as v2 moves the logits by > 3, against <= 0.0185 for the benign fp16 rounding."""
    fx = fixture("llama_8b_gall_act_sym_v1")
    exact = logits_of(dense_reference(fx.ckpt), fx.input_ids)
    misread = logits_of(dense_reference(fx.ckpt, v2=True), fx.input_ids)
    assert max_abs(exact, fx.logits) <= LOGIT_ATOL
    assert max_abs(misread, fx.logits) > 20 * LOGIT_ATOL


# ------------------------------------------------------------------------------------------------
# Peer tests: GPTQModel runs in its own venv through tests/peers/*.py.


@pytest.mark.peer
@needs_peer
def test_gptqmodel_regenerates_committed_fixture(tmp_path: Path) -> None:
    """GPTQModel 7.7 on CPU is deterministic: the same source, windows and settings give a
    byte-identical model.safetensors (measured across runs and OMP_NUM_THREADS 1 vs 2). We assert
    equality so a stale fixture or a GPTQModel behaviour change shows up. A CPU with another BLAS
    could round the Cholesky differently; the message says how many packed words differ so that
    case is told apart from a format change (which changes structure, zeros or g_idx wholesale)."""
    spec = regen.FIXTURES_BY_NAME["llama_4b_g32_act_sym_v1"]
    calib = regen.FIXTURES_DIR / "calibration.safetensors"
    assert torch.equal(
        load_file(str(calib))["input_ids"],
        tiny_models.calibration_ids(regen.CALIB_N, regen.CALIB_SEQLEN, regen.CALIB_SEED),
    ), "calibration windows are no longer reproducible from their seed"
    regen.build_fixture(regen.require_peer_python(), spec, tmp_path / spec.name, tmp_path / "work", calib)

    fresh = fixture_from(tmp_path / spec.name)
    committed = fixture(spec.name)
    assert sorted(fresh.ckpt.tensors) == sorted(committed.ckpt.tensors)
    differing = {
        k: f"{(fresh.ckpt.tensors[k] != v).float().mean().item():.2%} of {v.numel()}"
        for k, v in committed.ckpt.tensors.items()
        if not torch.equal(fresh.ckpt.tensors[k], v)
    }
    assert not differing, f"GPTQModel output changed: {differing}"
    fields = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
    assert {k: fresh.ckpt.qconfig[k] for k in fields} == {k: committed.ckpt.qconfig[k] for k in fields}
    assert torch.equal(fresh.input_ids, committed.input_ids)
    assert max_abs(fresh.logits, committed.logits) <= EXACT_ATOL


def _qc(bits: int, group_size: int, act_order: bool, sym: bool) -> QuantConfig:
    return QuantConfig(bits=bits, group_size=group_size, act_order=act_order, sym=sym,
                       damp_percent=regen.DAMP)


# case -> (conftest source-model fixture, settings); asym is written as v2 by quantpress.
QUANTPRESS_CASES = {
    "llama_4b_g32_act_sym_v1": ("tiny_llama", _qc(4, 32, act_order=True, sym=True)),
    "llama_3b_g64_act_sym_v1": ("tiny_llama", _qc(3, 64, act_order=True, sym=True)),
    "llama_4b_g32_act_asym_v2": ("tiny_llama", _qc(4, 32, act_order=True, sym=False)),
    "qwen2_4b_g64_sym_v1": ("tiny_qwen2", _qc(4, 64, act_order=False, sym=True)),  # q/k/v biases
    # the recommended levers: static act-order (desc_act false, trivial g_idx), weighted range
    # search, damp search; and SignRound's refined rounding on top
    "llama_4b_g32_recommended_sym_v1": ("tiny_llama", recommended(bits=4, group_size=32)),
    "llama_2b_g32_signround_sym_v1": ("tiny_llama", recommended(bits=2, group_size=32, method="signround",
                                                                signround_iters=20)),
}


@pytest.mark.peer
@needs_peer
@pytest.mark.parametrize("case", sorted(QUANTPRESS_CASES))
def test_quantpress_checkpoint_loads_in_gptqmodel(case: str, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    source_fixture, qconfig = QUANTPRESS_CASES[case]
    calib_ids = load_file(str(regen.FIXTURES_DIR / "calibration.safetensors"))["input_ids"]
    out = tmp_path / case
    quantpress.quantize(request.getfixturevalue(source_fixture), out, qconfig,
                        CalibrationConfig(nsamples=calib_ids.shape[0], seqlen=calib_ids.shape[1]),
                        examples=calib_ids)
    ckpt = read_checkpoint(out)
    assert ckpt.is_v2 == (not qconfig.sym)  # asym is written as v2; the peer must honour that
    if qconfig.act_order and qconfig.static_groups:  # static act-order: a plain checkpoint for every loader
        assert ckpt.qconfig["desc_act"] is False
        assert all(torch.equal(t, torch.arange(t.numel(), dtype=t.dtype) // qconfig.group_size)
                   for name, t in ckpt.tensors.items() if name.endswith(".g_idx"))

    ids_file = regen.write_ids(tmp_path / "input_ids.safetensors", tiny_models.eval_ids(
        regen.EVAL_N, regen.EVAL_SEQLEN, regen.EVAL_SEED))
    meta = regen.gptqmodel_logits(regen.require_peer_python(), out, ids_file, tmp_path / "logits.safetensors")
    assert meta["kernels"] == "TorchLinear" and meta["forward_dtype"] == "torch.float32", meta
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    ids = load_file(str(ids_file))["input_ids"]

    ours = logits_of(quantpress.load(out, dtype=torch.float32, exact=True).model, ids)
    assert max_abs(ours, theirs) <= LOGIT_ATOL
    # GPTQModel decoded quantpress's integers, zeros and g_idx exactly as the spec says.
    assert max_abs(logits_of(dense_reference(ckpt, dequant_dtype=torch.float16), ids), theirs) <= EXACT_ATOL
