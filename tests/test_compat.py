"""Kernel compatibility rules (spec A8): each case is one a plausible wrong rule would get wrong."""

from __future__ import annotations

import pytest

from quantpress.config import QuantConfig
from quantpress.formats import compat

# Mistral-7B's decoder Linears, (out_features N, in_features K)
MISTRAL = {
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def q(bits: int = 4, group_size: int = 128, act_order: bool = True, sym: bool = True) -> QuantConfig:
    return QuantConfig(bits=bits, group_size=group_size, act_order=act_order, sym=sym)


@pytest.mark.parametrize(("quant", "shapes", "exllama", "marlin", "vllm_gptq"), [
    # TheBloke's usual 4-bit variants: every fast kernel
    (q(4, 128), MISTRAL, True, True, True),
    (q(4, -1), MISTRAL, True, True, True),
    (q(4, 32, act_order=False), MISTRAL, True, True, True),
    # ExLlama is 4-bit only; Marlin is 4/8-bit only; vLLM gptq takes 2/3/4/8
    (q(3, 128), MISTRAL, False, False, True),
    (q(2, 128), MISTRAL, False, False, True),
    (q(8, 128), MISTRAL, False, True, True),
    # Marlin ignores qzeros, so it is sym only; ExLlamaV2 and vLLM gptq read gptq_v2 zeros
    (q(4, 128, sym=False), MISTRAL, True, False, True),
    # gs 96 divides K=4608 (so vLLM gptq is fine) but is neither a Marlin size nor a power of two,
    # which ExLlamaV2's recomputed group size needs
    (q(4, 96), {"mlp.up_proj": (4096, 4608)}, False, False, True),
    # gs 256 is a power of two (ExLlama fine) but not a Marlin group size
    (q(4, 256), MISTRAL, True, False, True),
    # a single group covers every row whatever size ExLlamaV2 recomputes
    (q(4, 96), {"x": (64, 96)}, True, False, True),
    # N = 96: not a multiple of Marlin's 64 threads, but of 32 (ExLlama) and 8 (4-bit packing)
    (q(4, 32), {"x": (96, 4096)}, True, False, True),
    # K = 192: a multiple of 64 and 32 but not of Marlin's 128
    (q(4, 64), {"x": (4096, 192)}, True, False, True),
    # K not a multiple of the group size breaks every kernel
    (q(4, 128), {"x": (4096, 4160)}, False, False, False),
    # gs -1 is one group over all of K, so any K that packs is fine, power of two or not
    (q(4, -1), {"mlp.down_proj": (4096, 11008)}, True, True, True),
])
def test_kernel_rules(quant, shapes, exllama, marlin, vllm_gptq):
    assert compat.exllama(quant, shapes).ok is exllama
    assert compat.marlin(quant, shapes).ok is marlin
    assert compat.vllm_gptq(quant, shapes).ok is vllm_gptq


def test_vllm_gptq_checks_the_pack_factor_numerator():
    # vLLM's pack_factor is Fraction(32, bits): 3-bit needs N % 32, 4-bit only N % 8
    assert compat.vllm_gptq(q(4, 128), {"x": (48, 4096)}).ok
    no = compat.vllm_gptq(q(3, 128), {"x": (48, 4096)})
    assert not no.ok and "32" in no.reason


def test_exllama_act_order_limits_k_to_uint16_permutation():
    wide = {"x": (4096, 65568)}  # K > 65535, a multiple of 32
    assert not compat.exllama(q(4, -1, act_order=True), wide).ok
    assert compat.exllama(q(4, -1, act_order=False), wide).ok


def test_every_module_is_checked_and_named():
    shapes = dict(MISTRAL, **{"zz.odd_proj": (4096 + 32, 4096)})  # sorts last, N % 64 != 0
    verdict = compat.marlin(q(4, 128), shapes)
    assert not verdict.ok and "zz.odd_proj" in verdict.reason


@pytest.mark.parametrize(("quant", "needle"), [
    (q(3, 128), "4-bit only"),
    (q(4, 128, sym=False), "symmetric"),
    (q(4, 96), "group size"),
])
def test_reasons_say_why(quant, needle):
    shapes = {"x": (4096, 4608)}
    verdicts = [compat.exllama(quant, shapes), compat.marlin(quant, shapes)]
    assert any(not v.ok and needle in v.reason for v in verdicts)


def test_no_shapes_leaves_only_the_config_rules():
    assert compat.marlin(q(4, 128), {}).ok
    assert not compat.marlin(q(4, 128, sym=False), {}).ok
    assert not compat.exllama(q(8, 128), {}).ok


def test_compat_is_truthy_only_when_ok():
    assert compat.Compat(True) and not compat.Compat(False, "why")


def test_vllm_names_the_kernel_it_picks():
    assert compat.vllm(q(4, 128), MISTRAL) == compat.Compat(True, "gptq_marlin")
    assert compat.vllm(q(3, 128), MISTRAL) == compat.Compat(True, "gptq")
    assert compat.vllm(q(4, 128, sym=False), MISTRAL) == compat.Compat(True, "gptq")
    assert not compat.vllm(q(4, 128), {"x": (4096, 4160)}).ok


def test_tgi_exllama_needs_4bit_without_act_order():
    assert compat.tgi_exllama(q(4, 128, act_order=False), MISTRAL).ok
    assert not compat.tgi_exllama(q(4, 128, act_order=True), MISTRAL).ok
    assert not compat.tgi_exllama(q(3, 128, act_order=False), MISTRAL).ok


@pytest.mark.parametrize(("quant", "expected"), [
    (q(4, 128, act_order=True), compat.Compat(True, "Marlin")),
    (q(4, 256, act_order=False), compat.Compat(True, "ExLlama")),  # not a Marlin group size
    (q(8, -1, act_order=True), compat.Compat(True, "Marlin")),
])
def test_tgi_picks_marlin_then_exllama(quant, expected):
    assert compat.tgi(quant, MISTRAL) == expected


def test_tgi_rejects_what_neither_kernel_runs_and_asym():
    assert not compat.tgi(q(4, 256, act_order=True), MISTRAL).ok
    assert not compat.tgi(q(3, 128, act_order=False), MISTRAL).ok
    asym = compat.tgi(q(4, 128, sym=False), MISTRAL)  # TGI decodes gptq_v2 zeros as v1
    assert not asym.ok and "gptq_v2" in asym.reason


def test_transformers_and_gptqmodel_read_every_variant():
    for quant in (q(2), q(3), q(4, sym=False), q(8, -1)):
        assert compat.gptqmodel(quant).ok and compat.transformers(quant).ok


def test_per_module_bits_are_for_gptqmodel_and_vllm_only():
    shapes = {"model.layers.0.mlp.down_proj": (576, 1536)}
    mixed = QuantConfig(bits=4, group_size=128, upgrade_budget=0.02)
    assert compat.gptqmodel(mixed) and compat.vllm(mixed, shapes)
    for verdict in (compat.exllama(mixed, shapes), compat.tgi(mixed, shapes), compat.transformers(mixed)):
        assert not verdict and "dynamic" in verdict.reason
