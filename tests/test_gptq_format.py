"""GPTQ checkpoint tensors (spec A2-A5) and quantize_config / quantization_config (spec A6)."""

from __future__ import annotations

import json

import pytest
import torch

from quantpress.config import CalibrationConfig, Method, QuantConfig
from quantpress.errors import CheckpointError, ConfigError, NonFiniteError
from quantpress.formats.gptq_config import GPTQFormatInfo, quantize_config_dict, read_format_info
from quantpress.formats.gptq_tensors import CheckpointFormat, from_gptq_tensors, to_gptq_tensors
from quantpress.quant.qweight import QuantizedWeight

BITS = (2, 3, 4, 8)
V1, V2 = CheckpointFormat.GPTQ, CheckpointFormat.GPTQ_V2


def _int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def make_qw(
    bits: int,
    *,
    N: int = 64,
    K: int = 128,
    group_size: int = 32,
    sym: bool = True,
    act_order: bool = False,
    min_zero: int = 0,
    seed: int = 0,
) -> QuantizedWeight:
    """A random, internally consistent QuantizedWeight (what the quantizer hands the writer)."""
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    g_idx = torch.arange(K) // gs
    if act_order:  # each group still holds gs channels, scattered over k (spec A5)
        g_idx = g_idx[torch.randperm(K, generator=g)]
    if sym:
        zeros = torch.full((G, N), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(min_zero, maxq + 1, (G, N), generator=g, dtype=torch.int32)
    return QuantizedWeight(
        intweight=torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32),
        scales=(torch.rand(G, N, generator=g) * 0.1 + 1e-3).to(torch.float16),
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=bits,
    )


# --- symmetric qzeros constants (spec A4 table) --------------------------------------------------

SYM_QZEROS_WORDS = {
    (2, V1): [0x55555555],
    (2, V2): [0xAAAAAAAA],
    (3, V1): [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D],
    (3, V2): [0x24924924, 0x49249249, 0x92492492],
    (4, V1): [0x77777777],
    (4, V2): [0x88888888],
    (8, V1): [0x7F7F7F7F],
    (8, V2): [0x80808080],
}


@pytest.mark.parametrize(("bits", "fmt"), list(SYM_QZEROS_WORDS))
def test_sym_qzeros_are_the_spec_constants(bits: int, fmt: CheckpointFormat) -> None:
    qw = make_qw(bits, N=96, sym=True)  # 96 columns = 3 blocks of 32 zeros per group
    qzeros = to_gptq_tensors(qw, fmt)["qzeros"]
    pattern = [_int32(w) for w in SYM_QZEROS_WORDS[(bits, fmt)]]
    words_per_row = 96 * bits // 32
    expected = pattern * (words_per_row // len(pattern))
    assert qzeros.tolist() == [expected] * qw.num_groups


def test_sym_4bit_qzeros_as_int32() -> None:
    qw = make_qw(4, sym=True)
    assert set(to_gptq_tensors(qw, V1)["qzeros"].flatten().tolist()) == {2004318071}
    assert set(to_gptq_tensors(qw, V2)["qzeros"].flatten().tolist()) == {-2004318072}


# --- tensors out -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_to_gptq_tensors_shapes_and_dtypes(bits: int) -> None:
    qw = make_qw(bits, N=64, K=128, group_size=32)
    t = to_gptq_tensors(qw, V1)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert (t["qweight"].dtype, tuple(t["qweight"].shape)) == (torch.int32, (128 * bits // 32, 64))
    assert (t["qzeros"].dtype, tuple(t["qzeros"].shape)) == (torch.int32, (4, 64 * bits // 32))
    assert (t["scales"].dtype, tuple(t["scales"].shape)) == (torch.float16, (4, 64))
    assert (t["g_idx"].dtype, tuple(t["g_idx"].shape)) == (torch.int32, (128,))
    assert all(v.is_contiguous() for v in t.values())  # safetensors refuses non-contiguous
    assert torch.equal(t["g_idx"], (torch.arange(128) // 32).to(torch.int32))


def test_qweight_packs_along_k_of_the_transposed_intweight() -> None:
    qw = make_qw(4, N=32, K=32, group_size=-1)
    intweight = torch.zeros(32, 32, dtype=torch.int32)
    intweight[5, 8] = 0xA  # out channel n=5, in channel k=8 -> qweight[1, 5] bits 0-3
    qw = QuantizedWeight(intweight, qw.scales, qw.zeros, qw.g_idx, 4)
    qweight = to_gptq_tensors(qw, V1)["qweight"]
    assert qweight[1, 5].item() == 0xA
    assert int(qweight.count_nonzero()) == 1


# --- round trips -------------------------------------------------------------------------------

ROUND_TRIPS = [
    (bits, fmt, sym, act_order)
    for bits in BITS
    for fmt, sym in ((V1, True), (V2, True), (V2, False))
    for act_order in (False, True)
]


@pytest.mark.parametrize(("bits", "fmt", "sym", "act_order"), ROUND_TRIPS)
def test_round_trip_is_bit_identical(bits: int, fmt: CheckpointFormat, sym: bool, act_order: bool) -> None:
    qw = make_qw(bits, sym=sym, act_order=act_order, seed=bits)
    back = from_gptq_tensors(to_gptq_tensors(qw, fmt), bits, fmt)
    assert torch.equal(back.intweight, qw.intweight)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and back.scales.dtype == torch.float16
    assert torch.equal(back.g_idx, qw.g_idx)  # act-order's scattered g_idx survives as is
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert back.bits == bits


def test_asym_v1_round_trips_when_no_zero_is_0() -> None:
    qw = make_qw(4, sym=False, min_zero=1, seed=5)
    back = from_gptq_tensors(to_gptq_tensors(qw, V1), 4, V1)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_v2_stores_zero_0_that_v1_cannot() -> None:
    qw = make_qw(4, sym=False, seed=1)
    qw.zeros[0, 0] = 0
    back = from_gptq_tensors(to_gptq_tensors(qw, V2), 4, V2)
    assert back.zeros[0, 0].item() == 0
    with pytest.raises(ConfigError, match="gptq_v2"):
        to_gptq_tensors(qw, V1)


def test_dequantize_matches_an_autogptq_style_consumer() -> None:
    """Decode the written tensors the way AutoGPTQ's qlinear_cuda does (wf shifts, zeros + 1)."""
    bits, maxq = 4, 15
    qw = make_qw(bits, sym=False, min_zero=1, act_order=True, seed=7)
    t = to_gptq_tensors(qw, V1)
    wf = torch.arange(0, 32, bits, dtype=torch.int32)  # [0, 4, ..., 28]
    zeros = (t["qzeros"].unsqueeze(2) >> wf.view(1, 1, -1)) & maxq  # [G, N/8, 8]
    zeros = zeros.reshape(t["scales"].shape) + 1  # [G, N]
    weight = (t["qweight"].unsqueeze(1) >> wf.view(1, -1, 1)) & maxq  # [K/8, 8, N]
    weight = weight.reshape(-1, t["qweight"].shape[1])  # [K, N]
    g = t["g_idx"].long()
    W = t["scales"].float()[g] * (weight - zeros[g]).float()  # [K, N]
    assert torch.equal(W.t(), qw.dequantize())


def test_v1_decodes_all_ones_field_as_2_pow_bits_without_modulo() -> None:
    # Every consumer computes field + 1 with no wrap, so an all-ones field means zero = 16.
    tensors = to_gptq_tensors(make_qw(4, N=32, K=32, group_size=-1), V1)
    tensors["qzeros"] = torch.full_like(tensors["qzeros"], -1)  # 0xFFFFFFFF
    qw = from_gptq_tensors(tensors, 4, V1)
    assert set(qw.zeros.flatten().tolist()) == {16}
    expected = qw.scales.float()[0].view(-1, 1) * (qw.intweight - 16).float()
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(to_gptq_tensors(qw, V1)["qzeros"], tensors["qzeros"])  # re-saves as is


def test_v1_and_v2_read_the_same_words_one_apart() -> None:
    tensors = to_gptq_tensors(make_qw(8, sym=True), V2)
    v1 = from_gptq_tensors(tensors, 8, V1)
    v2 = from_gptq_tensors(tensors, 8, V2)
    assert torch.equal(v1.zeros, v2.zeros + 1)
    assert set(v2.zeros.flatten().tolist()) == {128}


def test_fmt_may_be_given_as_string() -> None:
    qw = make_qw(4)
    assert torch.equal(to_gptq_tensors(qw, "gptq")["qzeros"], to_gptq_tensors(qw, V1)["qzeros"])
    assert torch.equal(from_gptq_tensors(to_gptq_tensors(qw, V2), 4, "gptq_v2").zeros, qw.zeros)


# --- missing g_idx -------------------------------------------------------------------------------


def _without_g_idx(qw: QuantizedWeight, fmt: CheckpointFormat = V1) -> dict[str, torch.Tensor]:
    tensors = to_gptq_tensors(qw, fmt)
    del tensors["g_idx"]
    return tensors


def test_missing_g_idx_is_derived_from_group_size() -> None:
    qw = make_qw(4, K=128, group_size=32)
    back = from_gptq_tensors(_without_g_idx(qw), 4, V1, group_size=32)
    assert torch.equal(back.g_idx, (torch.arange(128) // 32).to(torch.int32))
    assert torch.equal(back.dequantize(), qw.dequantize())
    per_row = make_qw(4, K=128, group_size=-1)
    assert set(from_gptq_tensors(_without_g_idx(per_row), 4, V1, group_size=-1).g_idx.tolist()) == {0}


def test_missing_g_idx_needs_a_matching_group_size() -> None:
    tensors = _without_g_idx(make_qw(4, K=128, group_size=32))
    with pytest.raises(CheckpointError, match="g_idx is missing"):
        from_gptq_tensors(tensors, 4, V1)
    with pytest.raises(CheckpointError, match=r"ceil\(128/64\) = 2 groups.*found 4"):
        from_gptq_tensors(tensors, 4, V1, group_size=64)


# --- reader validation ---------------------------------------------------------------------------


def _valid(bits: int = 4) -> dict[str, torch.Tensor]:
    return to_gptq_tensors(make_qw(bits, N=64, K=128, group_size=32), V1)


def _replace(key: str, value: torch.Tensor, bits: int = 4) -> dict[str, torch.Tensor]:
    tensors = _valid(bits)
    tensors[key] = value
    return tensors


BAD_TENSORS = [
    ("qweight int64", _replace("qweight", torch.zeros(16, 64, dtype=torch.int64)), 4,
     r"qweight: expected dtype torch.int32, found torch.int64"),
    ("qweight 1-D", _replace("qweight", torch.zeros(16, dtype=torch.int32)), 4, r"qweight: expected a 2-D"),
    ("3-bit rows not a multiple of 3", _replace("qweight", torch.zeros(13, 64, dtype=torch.int32), 3), 3,
     r"qweight: 13 rows .* multiple of 3 rows"),
    ("qzeros columns", _replace("qzeros", torch.zeros(4, 16, dtype=torch.int32)), 4,
     r"qzeros: expected shape \[4, 8\] .* found \[4, 16\]"),
    ("qzeros groups", _replace("qzeros", torch.zeros(3, 8, dtype=torch.int32)), 4,
     r"qzeros: expected shape \[4, 8\] .* found \[3, 8\]"),
    ("scales N", _replace("scales", torch.ones(4, 32, dtype=torch.float16)), 4,
     r"scales: expected shape \[G, 64\] .* found \[4, 32\]"),
    ("scales int", _replace("scales", torch.ones(4, 64, dtype=torch.int32)), 4,
     r"scales: expected dtype torch.float16, found torch.int32"),
    ("scales not fp16", _replace("scales", torch.full((4, 64), 0.1, dtype=torch.float32)), 4,
     r"scales: expected float16, found torch.float32"),
    ("g_idx length", _replace("g_idx", torch.zeros(64, dtype=torch.int32)), 4,
     r"g_idx: expected shape \[128\] .* found \[64\]"),
    ("g_idx >= G", _replace("g_idx", torch.full((128,), 4, dtype=torch.int32)), 4,
     r"g_idx: values must lie in \[0, 3\] .* found \[4, 4\]"),
    ("g_idx negative", _replace("g_idx", torch.full((128,), -1, dtype=torch.int32)), 4,
     r"g_idx: values must lie in \[0, 3\]"),
    ("g_idx float", _replace("g_idx", torch.zeros(128)), 4, r"g_idx: expected an integer dtype"),
    ("N not a multiple of 32", {
        "qweight": torch.zeros(16, 48, dtype=torch.int32), "qzeros": torch.zeros(4, 6, dtype=torch.int32),
        "scales": torch.ones(4, 48, dtype=torch.float16), "g_idx": torch.zeros(128, dtype=torch.int32),
    }, 4, r"N=48 output features is not a multiple of 32"),
]


@pytest.mark.parametrize(("case", "tensors", "bits", "message"), BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_inconsistent_tensors_are_refused(case: str, tensors: dict, bits: int, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        from_gptq_tensors(tensors, bits, V1)


def test_missing_tensor_and_bad_bits_are_refused() -> None:
    tensors = _valid()
    del tensors["qzeros"]
    with pytest.raises(CheckpointError, match="qzeros is missing"):
        from_gptq_tensors(tensors, 4, V1)
    with pytest.raises(CheckpointError, match="bits must be one of"):
        from_gptq_tensors(_valid(), 5, V1)


def test_errors_name_the_module() -> None:
    tensors = _replace("g_idx", torch.zeros(64, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=r"^model\.layers\.0\.mlp\.up_proj\.g_idx: expected shape"):
        from_gptq_tensors(tensors, 4, V1, name="model.layers.0.mlp.up_proj")


def test_wrong_bits_for_the_tensors_is_caught() -> None:
    # 4-bit tensors read as 8-bit: qweight rows imply K=64, then qzeros columns cannot match
    with pytest.raises(CheckpointError, match="qzeros: expected shape"):
        from_gptq_tensors(_valid(4), 8, V1)


def test_exactly_representable_fp32_scales_are_accepted() -> None:
    tensors = _valid()
    scales16 = tensors["scales"]
    tensors["scales"] = scales16.float()
    qw = from_gptq_tensors(tensors, 4, V1)
    assert qw.scales.dtype == torch.float16 and torch.equal(qw.scales, scales16)


# --- writer validation ---------------------------------------------------------------------------


def _with(qw: QuantizedWeight, **fields: object) -> QuantizedWeight:
    values = {f: getattr(qw, f) for f in ("intweight", "scales", "zeros", "g_idx", "bits")}
    values.update(fields)
    return QuantizedWeight(**values)  # type: ignore[arg-type]


def test_writer_refuses_inconsistent_weights() -> None:
    qw = make_qw(4, N=64, K=128, group_size=32)
    cases = [
        (_with(qw, zeros=qw.zeros[:2]), r"zeros must be \[G, N\]"),
        (_with(qw, scales=qw.scales[:, :32]), r"scales must be \[G, N\] with N=64"),
        (_with(qw, g_idx=qw.g_idx[:64]), r"g_idx must be \[K\] = \[128\]"),
        (_with(qw, g_idx=torch.full((128,), 4, dtype=torch.int32)), r"g_idx values must lie in \[0, 3\]"),
        (_with(qw, intweight=qw.intweight.float()), "integer tensor"),
        (_with(qw, intweight=qw.intweight + 16), r"\[0, 15\]"),
        (_with(qw, bits=5), "bits must be one of"),
        (_with(qw, zeros=torch.full_like(qw.zeros, 16)), r"zeros must lie in \[0, 15\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            to_gptq_tensors(bad, V2)


def test_writer_refuses_k_not_multiple_of_32() -> None:
    qw = make_qw(4, N=64, K=48, group_size=16)
    with pytest.raises(ConfigError, match="multiple of 32"):
        to_gptq_tensors(qw, V1)


def test_writer_refuses_scales_it_cannot_store_exactly() -> None:
    qw = make_qw(4)
    with pytest.raises(ConfigError, match="float16"):
        to_gptq_tensors(_with(qw, scales=torch.full(qw.scales.shape, 0.1)), V1)
    exact = to_gptq_tensors(_with(qw, scales=qw.scales.float()), V1)["scales"]
    assert exact.dtype == torch.float16 and torch.equal(exact, qw.scales)
    with pytest.raises(NonFiniteError):
        to_gptq_tensors(_with(qw, scales=torch.full(qw.scales.shape, float("nan"))), V1)
    with pytest.raises(NonFiniteError, match="overflow"):
        to_gptq_tensors(_with(qw, scales=torch.full(qw.scales.shape, 1e6)), V1)


# =================================================================================================
# config


AG_KEY_ORDER = [
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
    "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format",
]


def test_quantize_config_dict_fields_and_order() -> None:
    quant = QuantConfig(bits=4, group_size=128, act_order=True, sym=True, damp_percent=0.01, static_groups=True)
    calib = CalibrationConfig(dataset="wikitext2", nsamples=128, seqlen=2048, seed=3)
    d = quantize_config_dict(quant, calib, V1, tool_version="0.1.0", model_name_or_path="org/llama")
    assert list(d)[: len(AG_KEY_ORDER)] == AG_KEY_ORDER
    assert d == {
        # act-order with static groups stores every column in its natural group (trivial g_idx):
        # loaders must not apply act-order, so desc_act is False; meta records how it was quantized
        "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": True,
        "sym": True, "true_sequential": True, "model_name_or_path": "org/llama",
        "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq",
        "format": "gptq", "lm_head": False, "pack_dtype": "int32", "dataset": "wikitext2",
        "nsamples": 128, "seqlen": 2048,
        "meta": {
            "quantizer": ["quantpress:0.1.0"], "damp_percent": 0.01, "static_groups": True,
            "true_sequential": True, "mse": False, "mse_weighted": False, "upgrade_budget": 0.0,
            "group_aware": False, "damp_search": False, "act_order": True, "method": "gptq",
            "signround_iters": None, "signround_lr": None, "signround_target": None, "dataset": "wikitext2",
            "calibration_seed": 3, "calibration_dtype": "bfloat16", "hessian_inputs": "quantized",
            "prompt_template": None, "system_prompt": None,
        },
    }
    assert json.loads(json.dumps(d)) == d  # plain JSON types only (no enums, no tensors)
    assert type(d["checkpoint_format"]) is str
    dynamic = quantize_config_dict(QuantConfig(bits=4, group_size=128, act_order=True), calib, V1, tool_version="0.1.0")
    assert dynamic["desc_act"] is True and dynamic["meta"]["act_order"] is True  # g_idx permuted: loaders must know


def test_rtn_config_has_null_calibration_and_gptq_quant_method() -> None:
    quant = QuantConfig(bits=3, group_size=-1, sym=False, method=Method.RTN)
    d = quantize_config_dict(quant, None, V2, tool_version="9.9")
    assert d["quant_method"] == "gptq" and d["meta"]["method"] == "rtn"
    assert d["checkpoint_format"] == d["format"] == "gptq_v2"
    assert (d["dataset"], d["nsamples"], d["seqlen"]) == (None, None, None)
    assert d["meta"]["calibration_seed"] is None and d["meta"]["dataset"] is None
    assert d["meta"]["calibration_dtype"] is None and d["meta"]["hessian_inputs"] is None
    assert (d["group_size"], d["sym"]) == (-1, False)


def test_dataset_names_transformers_rejects_go_only_under_meta() -> None:
    quant = QuantConfig()
    d = quantize_config_dict(quant, CalibrationConfig(dataset="tinyshakespeare"), V1, tool_version="1")
    assert d["dataset"] is None and d["meta"]["dataset"] == "tinyshakespeare"
    d = quantize_config_dict(quant, CalibrationConfig(dataset="/home/alice/corpus.txt"), V1, tool_version="1")
    assert d["meta"]["dataset"] == "corpus.txt"
    assert "/home/alice" not in json.dumps(d)


def test_transformers_gptqconfig_accepts_our_dict() -> None:
    qc = pytest.importorskip("transformers.utils.quantization_config")
    for dataset, fmt in (("wikitext2", V1), ("tinyshakespeare", V2)):
        quant = QuantConfig(bits=4, group_size=64, act_order=True, sym=fmt is V1)
        d = quantize_config_dict(quant, CalibrationConfig(dataset=dataset), fmt, tool_version="0.1.0")
        config = qc.GPTQConfig.from_dict(d)
        assert (config.bits, config.group_size, config.desc_act, config.sym) == (4, 64, True, fmt is V1)
        assert config.format == fmt.value and config.to_dict()["checkpoint_format"] == fmt.value


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig(bits=4, group_size=128, sym=True),
        QuantConfig(bits=3, group_size=-1, act_order=True, sym=False),
        QuantConfig(bits=2, group_size=32, sym=False, method=Method.RTN),
        QuantConfig(bits=8, group_size=64, act_order=True, static_groups=True),
    ],
)
def test_config_round_trip(quant: QuantConfig) -> None:
    fmt = V1 if quant.sym else V2
    d = json.loads(json.dumps(quantize_config_dict(quant, CalibrationConfig(), fmt, tool_version="0.1.0")))
    expected = GPTQFormatInfo(quant.bits, quant.group_size, quant.desc_act, quant.sym, fmt, False, None)
    assert read_format_info({"quantization_config": d}, d) == expected
    assert read_format_info({"quantization_config": d}, None) == expected
    assert read_format_info({"model_type": "llama"}, d) == expected


# --- parsing what real checkpoints hold ----------------------------------------------------------

AUTOGPTQ = {  # AG BaseQuantizeConfig.to_dict()
    "bits": 4, "group_size": -1, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
    "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
    "quant_method": "gptq", "checkpoint_format": "gptq",
}
AUTOGPTQ_OLD = {  # before quant_method/checkpoint_format/sym existed
    "bits": 3, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "true_sequential": True,
    "model_name_or_path": None, "model_file_base_name": "model",
}
GPTQMODEL_1_9 = {
    "bits": 4, "dynamic": None, "group_size": 128, "desc_act": True, "sym": False, "lm_head": False,
    "quant_method": "gptq", "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
    "meta": {
        "quantizer": ["gptqmodel:1.9.0"], "uri": "https://github.com/modelcloud/gptqmodel",
        "damp_percent": 0.01, "damp_auto_increment": 0.0025, "static_groups": False,
        "true_sequential": True, "mse": 0.0,
    },
}
GPTQMODEL_HEAD = {
    "bits": 8, "dynamic": {}, "group_size": 32, "desc_act": False, "sym": True, "lm_head": False,
    "method": "gptq", "quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
    "pack_dtype": "int32",
    "meta": {
        "quantizer": ["gptqmodel:5.0.0"], "damp_percent": 0.05, "damp_auto_increment": 0.01,
        "static_groups": False, "true_sequential": True, "mse": 0.0, "act_group_aware": True,
        "gptaq": None, "foem": None, "fallback": {"strategy": "rtn", "threshold": "0.5%"},
    },
}
OPTIMUM_NEWEST = {  # transformers GPTQConfig after optimum+gptqmodel quantized an asym model
    "bits": 4, "dataset": "c4", "group_size": 128, "damp_percent": 0.1, "desc_act": False,
    "act_group_aware": True, "sym": False, "true_sequential": True, "quant_method": "gptq",
    "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj"], ["mlp.down_proj"]],
    "format": "gptq_v2", "meta": {"quantizer": ["optimum:2.0.0", "gptqmodel:4.0.0"]},
    "backend": "auto", "batch_size": 1, "cache_block_outputs": True, "model_seqlen": 4028,
}
TRANSFORMERS_MINIMAL = {  # what TF requires: group_size and desc_act fall back to 128 / False
    "bits": 2, "quant_method": "gptq", "checkpoint_format": "gptq", "use_exllama": False,
    "exllama_config": {"version": 1}, "tokenizer": None,
}
AWQ_SYNONYMS = {"w_bit": 4, "q_group_size": 64, "quant_method": "gptq", "sym": True}

PARSE_CASES = [
    ("autogptq", {"quantization_config": AUTOGPTQ}, AUTOGPTQ, GPTQFormatInfo(4, -1, True, True, V1)),
    ("autogptq-old-quantize_config-only", {}, AUTOGPTQ_OLD, GPTQFormatInfo(3, 128, False, True, V1)),
    ("gptqmodel-1.9", {"quantization_config": GPTQMODEL_1_9}, GPTQMODEL_1_9,
     GPTQFormatInfo(4, 128, True, False, V2)),
    ("gptqmodel-head", {"quantization_config": GPTQMODEL_HEAD}, None, GPTQFormatInfo(8, 32, False, True, V1)),
    ("optimum-newest", {"quantization_config": OPTIMUM_NEWEST}, None,
     GPTQFormatInfo(4, 128, False, False, V2, False,
                    [["self_attn.q_proj", "self_attn.k_proj"], ["mlp.down_proj"]])),
    ("transformers-minimal", {"quantization_config": TRANSFORMERS_MINIMAL}, None,
     GPTQFormatInfo(2, 128, False, True, V1)),
    ("w_bit-q_group_size", {"quantization_config": AWQ_SYNONYMS}, None, GPTQFormatInfo(4, 64, False, True, V1)),
]


@pytest.mark.parametrize(("case", "config", "quantize_config", "expected"), PARSE_CASES,
                         ids=[c[0] for c in PARSE_CASES])
def test_parse_real_world_configs(case: str, config: dict, quantize_config: dict | None,
                                  expected: GPTQFormatInfo) -> None:
    assert read_format_info(config, quantize_config) == expected


def test_quantization_config_wins_and_quantize_config_fills_gaps() -> None:
    primary = {"bits": 4, "quant_method": "gptq", "sym": False, "format": "gptq_v2"}
    secondary = {"bits": 8, "group_size": 64, "desc_act": True, "sym": True, "checkpoint_format": "gptq"}
    info = read_format_info({"quantization_config": primary}, secondary)
    # bits/sym/format from config.json (format and checkpoint_format are one key), rest filled in
    assert info == GPTQFormatInfo(4, 64, True, False, V2)


REJECTIONS = [
    ("awq", {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "gemm"},
     r"quant_method is 'awq', not 'gptq'"),
    ("compressed-tensors", {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
     r"quant_method is 'compressed-tensors', not 'gptq'"),
    ("marlin format", {**AUTOGPTQ, "checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' is a repacked"),
    ("bitblas format", {**GPTQMODEL_1_9, "checkpoint_format": "bitblas"}, r"'bitblas' is a repacked"),
    ("is_marlin_format", {**AUTOGPTQ, "is_marlin_format": True}, r"is_marlin_format is true"),
    ("quant_method marlin", {**AUTOGPTQ, "quant_method": "marlin"}, r"quant_method 'marlin'"),
    ("planar layout", {**GPTQMODEL_HEAD, "format": "gptq_p", "checkpoint_format": "gptq_p"},
     r"unknown checkpoint_format 'gptq_p'"),
    ("pack_dtype int16", {**GPTQMODEL_HEAD, "pack_dtype": "int16"}, r"pack_dtype 'int16' is not supported"),
    ("bits 5", {**AUTOGPTQ, "bits": 5}, r"bits must be one of \(2, 3, 4, 8\), found 5"),
    ("bits missing", {"quant_method": "gptq", "group_size": 128}, r"no 'bits'"),
    ("dynamic other override", {**GPTQMODEL_HEAD, "dynamic": {"+:.*down_proj": {"sym": False}}},
     r"decodes per-module bits and group_size only"),
    ("dynamic bad regex", {**GPTQMODEL_HEAD, "dynamic": {"+:(": {"bits": 8}}}, r"not a regular expression"),
    ("dynamic bits 5", {**GPTQMODEL_HEAD, "dynamic": {"+:.*down_proj": {"bits": 5}}}, r"bits must be one of"),
    ("lm_head", {**GPTQMODEL_1_9, "lm_head": True}, r"lm_head.*not supported yet"),
    ("format conflict", {**AUTOGPTQ, "format": "gptq_v2"}, r"'checkpoint_format' is 'gptq' but .* 'format' is 'gptq_v2'"),
    ("group_size 0", {**AUTOGPTQ, "group_size": 0}, r"group_size must be -1 or a positive integer, found 0"),
    ("sym as string", {**AUTOGPTQ, "sym": "true"}, r"sym must be true or false, found 'true'"),
    ("modules_in_block wrong type", {**OPTIMUM_NEWEST, "modules_in_block_to_quantize": ["q_proj"]},
     r"modules_in_block_to_quantize must be a list of lists"),
]


@pytest.mark.parametrize(("case", "quantization_config", "message"), REJECTIONS, ids=[c[0] for c in REJECTIONS])
def test_unsupported_configs_are_rejected(case: str, quantization_config: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        read_format_info({"quantization_config": quantization_config}, None)


def test_no_quantization_settings_at_all() -> None:
    with pytest.raises(CheckpointError, match="no quantization_config"):
        read_format_info({"model_type": "llama"}, None)


def test_quantize_config_json_alone_is_also_checked() -> None:
    with pytest.raises(CheckpointError, match="lm_head"):
        read_format_info({}, {**AUTOGPTQ, "lm_head": True})


def test_dynamic_overrides_follow_gptqmodel_first_match_semantics() -> None:
    info = read_format_info({"quantization_config": {**GPTQMODEL_HEAD, "bits": 4, "group_size": 128, "dynamic": {
        r"+:^model\.layers\.28\.mlp\.down_proj$": {"bits": 8},
        r"+:.*\.mlp\.": {"group_size": 32},
        r"-:.*lm_head": {},
    }}}, None)
    assert info.module_settings("model.layers.28.mlp.down_proj") == (8, 128)
    assert info.module_settings("model.layers.2.mlp.down_proj") == (4, 32)  # the first match wins
    assert info.module_settings("model.layers.2.self_attn.q_proj") == (4, 128)
    with pytest.raises(CheckpointError, match="excludes it"):
        info.module_settings("lm_head")

