"""Typed configuration: one frozen dataclass per concept, validated on construction.

`QuantConfig` says how weights are quantized; `CalibrationConfig` says which data drives GPTQ.
Both are written to `quantize_config.json` as-is (see `formats/gptq_config.py`), and names
(`variant_name`) are derived from them one way only — nothing parses a name back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from quantpress.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
SIGNROUND_TARGETS = ("layer", "model")


class Method(str, Enum):
    GPTQ = "gptq"
    RTN = "rtn"  # round-to-nearest with the same quantizer: the baseline GPTQ must beat
    # GPTQ, then each decoder layer's rounding and ranges tuned by SignRound against the
    # full-precision model's outputs (quant/signround.py): slower, best at 2-3 bits
    SIGNROUND = "signround"


@dataclass(frozen=True)
class QuantConfig:
    """How each Linear weight of the decoder layers is quantized (spec section B)."""

    bits: int = 4
    group_size: int = 128  # -1: one scale/zero per output row over all input features
    act_order: bool = False  # "desc_act": quantize columns in order of decreasing diag(H)
    sym: bool = True
    static_groups: bool = False  # group params from the pre-GPTQ weight, in natural order
    true_sequential: bool = True  # q/k/v -> o -> gate/up -> down, each seeing quantized inputs
    damp_percent: float = 0.1  # added to diag(H) as a fraction of its mean
    mse: bool = False  # search a shrunken clipping range per group (B1 `mse`)
    # weight the range search's error per input column by diag(H), the mean squared activation
    # of that input (llm-compressor's `imatrix_mse`): clip where it costs the output least
    mse_weighted: bool = False
    # group-aware reordering (GAR, GPTQModel's default): quantize whole groups in order of their
    # largest diag(H), and columns within a group by diag(H); groups stay contiguous, so g_idx is
    # trivial and every kernel runs it at full speed (unlike act_order without static_groups)
    group_aware: bool = False
    # choose damp_percent per module from DAMP_GRID by the lowest output error on the calibration
    # data, tr((W - Q) H (W - Q)^T); damp_percent is then only the fallback for RTN-like failures
    damp_search: bool = False
    # per-module precision (mixed_precision.py): extra bytes, as a fraction of the quantized
    # Linear weights, spent on storing the modules with the worst output error at 8 bits
    upgrade_budget: float = 0.0
    block_size: int = 128  # lazy-batch width of the GPTQ update
    method: Method = Method.GPTQ
    signround_iters: int = 200  # SignRound steps per decoder layer (AutoRound's default)
    signround_lr: float = 0.0  # SignRound's first step size; 0: 1 / signround_iters
    # what SignRound matches: "model", the full-precision model's outputs at this layer (AutoRound's
    # choice: also undo the earlier layers' drift, at the cost of a second activation stream);
    # "layer", the full-precision layer's outputs on the quantized model's inputs (its own error only)
    signround_target: str = "model"

    @property
    def desc_act(self) -> bool:
        """Whether loaders must apply act-order (the checkpoint's `desc_act`): only when groups were
        formed in permuted order. Static act-order stores each column in its natural group, so
        g_idx is the trivial k // group_size and the file is a plain GPTQ checkpoint for every
        loader and kernel (TGI's ExLlama path included)."""
        return self.act_order and not self.static_groups

    @property
    def calibrated(self) -> bool:
        """Whether the method reads calibration data (everything but RTN)."""
        return self.method is not Method.RTN

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"group_size must be -1 or positive, got {self.group_size}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", Method(self.method))
        if self.method is Method.RTN and (self.act_order or self.group_aware or self.damp_search):
            raise ConfigError("act_order, group_aware and damp_search use the Hessian, which RTN does not compute")
        if not 0.0 <= self.upgrade_budget < 1.0:
            raise ConfigError(f"upgrade_budget must be in [0, 1), got {self.upgrade_budget}")
        if self.upgrade_budget and (self.method is Method.RTN or self.bits >= 8):
            raise ConfigError("upgrade_budget stores some modules at 8 bits: it needs GPTQ (for the output "
                              "errors) and bits below 8")
        if self.signround_iters <= 0 or not 0.0 <= self.signround_lr < 1.0:
            raise ConfigError(f"signround_iters must be positive and signround_lr in [0, 1), got "
                              f"{self.signround_iters} and {self.signround_lr}")
        if self.signround_target not in SIGNROUND_TARGETS:
            raise ConfigError(f"signround_target must be one of {SIGNROUND_TARGETS}, got {self.signround_target!r}")
        if self.method is Method.SIGNROUND and self.act_order and not self.static_groups:
            raise ConfigError("SignRound tunes contiguous groups: act_order needs static_groups=True with it")
        if self.mse_weighted and not self.mse:
            raise ConfigError("mse_weighted weights the range search: it needs mse=True")
        if self.group_aware and (self.act_order or self.group_size == -1):
            raise ConfigError("group_aware reorders whole groups: it needs a group size and excludes act_order")


# The levers that won on SmolLM2-135M (BENCHMARKS.md §7, 4-bit g128: classic GPTQ +31.4% perplexity
# over full precision, these +9.9%, mean of 3 calibration seeds): act-order with static groups,
# the range search weighted by each input's mean square, damping chosen per module. All three are free at inference: the files are
# plain GPTQ checkpoints with a trivial g_idx that every loader and kernel reads at full speed.
RECOMMENDED_LEVERS = {"act_order": True, "static_groups": True, "mse": True, "mse_weighted": True,
                      "damp_search": True}


def recommended(**settings) -> QuantConfig:
    """A QuantConfig with the recommended levers wherever `settings` leave a choice open (absent or
    None): what `quantpress quantize`, `quantpress.quantize()` and release recipes use by default.
    RTN has no Hessian and gets none of them; asking for group_aware replaces act-order, and
    mse=False takes the weighted range search with it."""
    given = {k: v for k, v in settings.items() if v is not None}
    levers = dict(RECOMMENDED_LEVERS)
    if Method(given.get("method", Method.GPTQ)) is Method.RTN:
        levers = {}
    if given.get("group_aware"):
        levers = {k: v for k, v in levers.items() if k not in ("act_order", "static_groups")}
    if given.get("mse") is False:
        levers.pop("mse_weighted", None)
    return QuantConfig(**{**levers, **given})


COMPUTE_DTYPES = ("bfloat16", "float32")  # fp16 is left out: its CPU matmuls are ~50x slower


@dataclass(frozen=True)
class CalibrationConfig:
    """Which token windows GPTQ sees: `nsamples` random windows of `seqlen` tokens (IST sampler)."""

    dataset: str = "wikitext2"  # a bundled dataset name, or a path to a UTF-8 text file
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    # dtype of the calibration forward passes and the stored activations. bfloat16 is what the
    # peers and GPU users run (the model's own dtype); on CPUs with AMX/AVX512-BF16 its GEMMs are
    # ~7x faster than fp32, and it halves activation memory. Hessians are always accumulated and
    # the GPTQ solve always runs in fp32, whichever is chosen.
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.nsamples <= 0:
            raise ConfigError(f"nsamples must be positive, got {self.nsamples}")
        if self.seqlen <= 1:
            raise ConfigError(f"seqlen must be at least 2, got {self.seqlen}")


@dataclass(frozen=True)
class ChatConfig:
    """How the model expects to be prompted. Written to quantize_config.json `meta` so `chat` and
    `serve` pick the format up with no flags (the model card shows the same template)."""

    template: str | None = None  # a quantpress.prompts.TEMPLATES name; None: not recorded
    system_prompt: str | None = None  # None: the template's default


def variant_name(quant: QuantConfig) -> str:
    """The branch/folder name of a variant, TheBloke's convention: `gptq-4bit-128g-actorder_True`,
    and `gptq-8bit--1g-actorder_True` for one group per row."""
    group = f"{quant.group_size}g"
    name = f"{quant.method.value}-{quant.bits}bit-{group}-actorder_{quant.act_order}"
    return name if quant.sym else name + "-asym"
