"""Which inference kernels can run a GPTQ checkpoint, derived from its settings and Linear shapes.

Pure functions over a QuantConfig and the quantized Linears' shapes, `{module: (N, K)}` with
N = out_features and K = in_features (spec A2). Each rule cites the kernel condition it mirrors
from the GPTQ spec, section A8 (and pitfall D7). Tensor parallelism is not modelled: every
`K_per_partition`/`N_per_partition` of the spec is the full K/N here (TP = 1).

Hardware conditions (CUDA capability >= 8.0 for Marlin) are not a property of the files; the
card states them next to the answer instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from quantpress.config import QuantConfig

Shapes = Mapping[str, tuple[int, int]]  # module name -> (out_features N, in_features K)

MARLIN_BITS = (4, 8)  # vLLM marlin_utils / TGI GPTQ_MARLIN_BITS
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_MIN_THREAD_N = 64  # GPTQ_MARLIN_MIN_THREAD_N
MARLIN_MIN_THREAD_K = 128  # GPTQ_MARLIN_MIN_THREAD_K
VLLM_GPTQ_BITS = (2, 3, 4, 8)
GPTQMODEL_BITS = (2, 3, 4, 8)  # GPTQModel's torch/triton kernels; also what transformers uses
EX2_MAX_ACT_ORDER_K = 65535  # EX2 make_sequential stores the act-order permutation as uint16


@dataclass(frozen=True)
class Compat:
    """Whether a kernel/loader can run the checkpoint. `reason` says why not when `ok` is False;
    when `ok` is True it may name the kernel or a condition worth knowing (or be empty)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_YES = Compat(True)
# Loaders that ignore GPTQModel's per-module `dynamic` would decode 8-bit modules as base-bit ones.
_NO_DYNAMIC = "per-module bits (`dynamic`, upgrade_budget > 0) are read only by GPTQModel and vLLM"


def _first_failure(checks: Iterable[Compat]) -> Compat:
    """The first failed check, or a plain Yes."""
    return next((c for c in checks if not c.ok), _YES)


def _require(condition: bool, reason: str) -> Compat:
    return _YES if condition else Compat(False, reason)


def _each_module(shapes: Shapes, check: Callable[[str, int, int], Compat]) -> Compat:
    """Shape rules hold per Linear: one misfit module makes the whole checkpoint unloadable."""
    return _first_failure(check(name, n, k) for name, (n, k) in sorted(shapes.items()))


def _k_divisible_by_group(quant: QuantConfig, shapes: Shapes) -> Compat:
    # gs = -1 means one group spanning all of K (spec A2), which always divides.
    if quant.group_size == -1:
        return _YES
    return _each_module(shapes, lambda name, n, k: _require(
        k % quant.group_size == 0,
        f"{name}: in_features {k} is not a multiple of the group size {quant.group_size}"))


def _ex2_group_size(k: int, groups: int) -> int:
    """The group size ExLlamaV2 assumes: q_matrix.cu recomputes it from the group count as
    `groupsize = 1; while (groupsize * groups < height) groupsize *= 2;` (spec A8)."""
    group_size = 1
    while group_size * groups < k:
        group_size *= 2
    return group_size


def _ex2_group_rule(quant: QuantConfig, name: str, k: int) -> Compat:
    groups = 1 if quant.group_size == -1 else k // quant.group_size
    # One group covers every row whatever the recomputed size; with more groups a stored size
    # that is not the kernel's power of two maps rows to the wrong scales.
    if groups > 1 and _ex2_group_size(k, groups) != quant.group_size:
        return Compat(False, f"ExLlamaV2 assumes power-of-two group sizes; group size {quant.group_size} "
                             f"would be read as {_ex2_group_size(k, groups)} ({name})")
    return _YES


def exllama(quant: QuantConfig, shapes: Shapes) -> Compat:
    """ExLlama v1/v2 (the "ExLlama" column of TheBloke's cards; TGI's and text-generation-webui's
    default GPTQ kernel). Spec A8, ExLlama v1 and ExLlamaV2 kernel."""
    def shape_rules(name: str, n: int, k: int) -> Compat:
        return _first_failure((
            # AG qlinear_exllamav2 asserts K % 32 == 0 and N % 32 == 0 (v1 pads N, v2 does not)
            _require(k % 32 == 0, f"{name}: in_features {k} is not a multiple of 32"),
            _require(n % 32 == 0, f"{name}: out_features {n} is not a multiple of 32"),
            _ex2_group_rule(quant, name, k),
            # make_sequential keeps the act-order permutation in uint16 (spec A5)
            _require(not quant.desc_act or k <= EX2_MAX_ACT_ORDER_K,
                     f"{name}: act-order needs in_features <= {EX2_MAX_ACT_ORDER_K}, got {k}"),
        ))

    return _first_failure((
        # q_matrix.cu handles GPTQ as 4-bit rows only (`rows_4 = height`); pitfall D7
        _require(quant.bits == 4, f"ExLlama kernels are 4-bit only, this is {quant.bits}-bit"),
        _require(not quant.upgrade_budget, _NO_DYNAMIC),
        _k_divisible_by_group(quant, shapes),
        _each_module(shapes, shape_rules),
        # sym and asym both load: EX2 reads gptq_v2 qzeros with an offset (checkpoint_offset_qzeros)
    ))


def marlin(quant: QuantConfig, shapes: Shapes) -> Compat:
    """vLLM's gptq_marlin (auto-selected for GPTQ when compatible). Spec A8, vLLM gptq_marlin."""
    def shape_rules(name: str, n: int, k: int) -> Compat:
        return _first_failure((
            _require(n % MARLIN_MIN_THREAD_N == 0,
                     f"Marlin needs out_features divisible by {MARLIN_MIN_THREAD_N}; {name} has {n}"),
            _require(k % MARLIN_MIN_THREAD_K == 0,
                     f"Marlin needs in_features divisible by {MARLIN_MIN_THREAD_K}; {name} has {k}"),
        ))

    return _first_failure((
        _require(quant.bits in MARLIN_BITS, f"Marlin supports {'/'.join(map(str, MARLIN_BITS))}-bit only, "
                                            f"this is {quant.bits}-bit"),
        # TYPE_MAP has only (4, True) and (8, True): Marlin ignores qzeros and assumes the sym bias
        _require(quant.sym, "Marlin supports symmetric quantization only (it ignores qzeros)"),
        _require(quant.group_size in MARLIN_GROUP_SIZES,
                 f"Marlin supports group sizes {', '.join(map(str, MARLIN_GROUP_SIZES))}; "
                 f"this is {quant.group_size}"),
        _each_module(shapes, shape_rules),
        _k_divisible_by_group(quant, shapes),
    ))


def vllm_gptq(quant: QuantConfig, shapes: Shapes) -> Compat:
    """vLLM's `gptq` method (exllama-derived gptq_gemm), its fallback when Marlin does not fit.
    Spec A8, vLLM gptq: sym or asym, v1 or v2 qzeros."""
    # vLLM's pack_factor is Fraction(32, bits); create_weights checks its numerator (32 for 3-bit)
    pack_numerator = Fraction(32, quant.bits).numerator
    return _first_failure((
        _require(quant.bits in VLLM_GPTQ_BITS, f"vLLM gptq supports {VLLM_GPTQ_BITS} bits, not {quant.bits}"),
        _k_divisible_by_group(quant, shapes),
        _each_module(shapes, lambda name, n, k: _require(
            n % pack_numerator == 0,
            f"{name}: out_features {n} is not a multiple of {pack_numerator} ({quant.bits}-bit packing)")),
    ))


def vllm(quant: QuantConfig, shapes: Shapes) -> Compat:
    """vLLM as a whole: gptq_marlin when it fits, else the gptq kernel."""
    # the Yes names the kernel; gptq_marlin also needs CUDA capability >= 8.0, else vLLM uses gptq
    if marlin(quant, shapes):
        return Compat(True, "gptq_marlin")
    fallback = vllm_gptq(quant, shapes)
    return Compat(True, "gptq") if fallback else fallback


def gptqmodel(quant: QuantConfig) -> Compat:
    """GPTQModel: every bit width we write, sym or asym, v1 or v2 qzeros (spec A4, D1)."""
    return _require(quant.bits in GPTQMODEL_BITS, f"GPTQModel supports {GPTQMODEL_BITS} bits, not {quant.bits}")


def transformers(quant: QuantConfig) -> Compat:
    """transformers/optimum: GPTQ loads through the gptqmodel backend (AutoGPTQ is end-of-life),
    so the rules are GPTQModel's; asym files are gptq_v2, which only that backend reads (D1)."""
    backend = gptqmodel(quant)
    if backend and quant.upgrade_budget:  # its GPTQConfig has no `dynamic`: a size mismatch at load
        return Compat(False, _NO_DYNAMIC + " (load with GPTQModel.load)")
    return Compat(True, "needs optimum + gptqmodel") if backend else backend


def tgi_exllama(quant: QuantConfig, shapes: Shapes) -> Compat:
    """TGI's ExLlama path: `bits == 4 and not desc_act` (spec A8, TGI), plus the kernel's own rules."""
    return _first_failure((
        exllama(quant, shapes),
        _require(not quant.desc_act, "TGI uses ExLlama only without act-order (desc_act)"),
    ))


def tgi(quant: QuantConfig, shapes: Shapes) -> Compat:
    """text-generation-inference: its Marlin path (`can_use_gptq_marlin`), else its ExLlama path."""
    # TGI's GPTQ loader ignores checkpoint_format (spec A4): it adds 1 to every stored zero, which
    # is wrong for the gptq_v2 files quantpress writes for asym variants.
    if not quant.sym:
        return Compat(False, "TGI reads qzeros as v1 (`gptq`); asym checkpoints are gptq_v2")
    if quant.upgrade_budget:
        return Compat(False, _NO_DYNAMIC)
    # vLLM's Marlin shape rule is a subset of TGI's `_check_valid_shape`, so a Yes here holds there
    if marlin(quant, shapes):
        return Compat(True, "Marlin")  # on CUDA capability >= 8.0, like vLLM's
    if tgi_exllama(quant, shapes):
        return Compat(True, "ExLlama")
    return Compat(False, "neither TGI's Marlin nor its ExLlama kernel fits "
                         f"({marlin(quant, shapes).reason}; {tgi_exllama(quant, shapes).reason})")
