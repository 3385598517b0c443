"""QuantizedWeight <-> the GPTQ checkpoint tensors of one Linear (spec A2-A5).

For a Linear with weight [N, K] (out, in), b bits and G groups, a checkpoint holds:
  qweight [K*b/32, N]  int32    intweight packed along K
  qzeros  [G, N*b/32]  int32    zero points packed along N; v1 ("gptq") stores zero - 1
  scales  [G, N]       float16
  g_idx   [K]          int32    group of each input channel
The caller adds the module prefix (`model.layers.0.mlp.up_proj.` + key) and handles `bias`.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from quantpress.errors import CheckpointError, ConfigError, NonFiniteError
from quantpress.formats.packing import PACKABLE_BITS, pack_cols, pack_rows, unpack_cols, unpack_rows
from quantpress.quant.qweight import QuantizedWeight


class CheckpointFormat(str, Enum):
    """How qzeros are stored; the config's `checkpoint_format` (and `format`) value."""

    GPTQ = "gptq"  # v1: stores zero - 1; every consumer adds the 1 back
    GPTQ_V2 = "gptq_v2"  # stores the true zero (GPTQModel >= 0.9)


def to_gptq_tensors(qw: QuantizedWeight, fmt: CheckpointFormat) -> dict[str, Tensor]:
    """Pack one quantized weight into its checkpoint tensors (keys without the module prefix).

    Returns contiguous tensors: qweight int32 [K*b/32, N], qzeros int32 [G, N*b/32],
    scales float16 [G, N], g_idx int32 [K]. Raises ConfigError when the weight is inconsistent
    (shapes, ranges, K or N not a multiple of 32) or not representable in `fmt` (a zero of 0
    under v1), and NonFiniteError for NaN/Inf scales. Decoding the result with
    `from_gptq_tensors` gives back a weight whose `dequantize()` is bit-identical.
    """
    fmt = CheckpointFormat(fmt)
    _check_quantized_weight(qw)
    return {
        "qweight": pack_rows(qw.intweight.t(), qw.bits),  # [N, K] -> [K, N] -> [K*b/32, N]
        "qzeros": pack_cols(_stored_zeros(qw.zeros, qw.bits, fmt), qw.bits),  # [G, N*b/32]
        "scales": _fp16_scales(qw.scales),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def from_gptq_tensors(
    tensors: dict[str, Tensor],
    bits: int,
    fmt: CheckpointFormat,
    *,
    group_size: int | None = None,
    name: str = "",
) -> QuantizedWeight:
    """Decode one Linear's checkpoint tensors exactly as GPTQ consumers do (spec A2, A4).

    `tensors` holds "qweight", "qzeros", "scales" and usually "g_idx" (other keys, e.g. "bias",
    are ignored). Without "g_idx" (some old files) `group_size` is required and
    g_idx[k] = k // group_size; when "g_idx" is present it wins and `group_size` is unused.
    v1 zeros are the unpacked field + 1 with no wrap-around, as AutoGPTQ, ExLlama and vLLM compute
    them, so an all-ones field decodes to 2^bits, just as it does in those loaders.
    `name` (the module prefix) only makes error messages point at the right tensor.
    Raises CheckpointError naming the expected and found dtype/shape/value on any inconsistency.
    The returned intweight may be a transposed view of the unpacked tensor.
    """
    fmt = CheckpointFormat(fmt)
    where = f"{name}." if name else ""
    if isinstance(bits, bool) or bits not in PACKABLE_BITS:
        raise CheckpointError(f"{where}qweight: bits must be one of {PACKABLE_BITS}, got {bits!r}")
    qweight = _require(tensors, "qweight", where, dims=2, dtype=torch.int32)
    qzeros = _require(tensors, "qzeros", where, dims=2, dtype=torch.int32)
    scales = _require(tensors, "scales", where, dims=2, dtype=None)
    K, N, G = _checked_dims(qweight, qzeros, scales, bits, where)
    g_idx = _g_idx(tensors.get("g_idx"), K, G, group_size, where, qweight.device)

    intweight = unpack_rows(qweight, bits).t()  # [K, N] -> [N, K]
    zeros = unpack_cols(qzeros, bits)  # [G, N]
    if fmt is CheckpointFormat.GPTQ:
        zeros = zeros + 1  # v1 stores zero - 1; no modulo, exactly like every consumer
    return QuantizedWeight(
        intweight=intweight,
        scales=_read_scales(scales, where),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
    )


# ---------------------------------------------------------------------------------------------
# writer side: problems are in the quantizer's output, so they are ConfigError


def _check_quantized_weight(qw: QuantizedWeight) -> None:
    """Shapes/dtypes of a QuantizedWeight agree with each other (see its docstring)."""
    if isinstance(qw.bits, bool) or qw.bits not in PACKABLE_BITS:
        raise ConfigError(f"bits must be one of {PACKABLE_BITS}, got {qw.bits!r}")
    for field in ("intweight", "zeros", "g_idx"):
        t = getattr(qw, field)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ConfigError(f"QuantizedWeight.{field} must be an integer tensor, got {t.dtype}")
    if qw.intweight.dim() != 2:
        raise ConfigError(f"intweight must be [N, K], got shape {list(qw.intweight.shape)}")
    N, K = qw.intweight.shape
    G = qw.scales.shape[0] if qw.scales.dim() == 2 else -1
    if G < 1 or list(qw.scales.shape) != [G, N]:
        raise ConfigError(f"scales must be [G, N] with N={N}, got shape {list(qw.scales.shape)}")
    if list(qw.zeros.shape) != [G, N]:
        raise ConfigError(f"zeros must be [G, N] = {[G, N]} like scales, got {list(qw.zeros.shape)}")
    if list(qw.g_idx.shape) != [K]:
        raise ConfigError(f"g_idx must be [K] = [{K}], got shape {list(qw.g_idx.shape)}")
    if K and not (0 <= int(qw.g_idx.min()) and int(qw.g_idx.max()) < G):
        raise ConfigError(
            f"g_idx values must lie in [0, {G - 1}] (G={G} groups), found "
            f"[{int(qw.g_idx.min())}, {int(qw.g_idx.max())}]"
        )


def _stored_zeros(zeros: Tensor, bits: int, fmt: CheckpointFormat) -> Tensor:
    """[G, N] true zeros -> the field values the format stores (v1: zero - 1)."""
    maxq = (1 << bits) - 1
    lo, hi = (int(zeros.min()), int(zeros.max())) if zeros.numel() else (0, 0)
    if fmt is CheckpointFormat.GPTQ_V2:
        if lo < 0 or hi > maxq:
            raise ConfigError(f"zeros must lie in [0, {maxq}] for {bits}-bit, found [{lo}, {hi}]")
        return zeros
    if lo == 0:
        # AutoGPTQ would store -1 = 0xFFFFFFFF and corrupt every field above it in the word
        # (spec A4/D1): v1 cannot represent this group, only v2 can.
        raise ConfigError(
            "a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1 stores zero - 1); "
            "asymmetric results need checkpoint_format 'gptq_v2'"
        )
    # zero = 2^bits is allowed: it is what an all-ones v1 field decodes to, so v1 files re-save
    # bit-exactly.
    if lo < 0 or hi > maxq + 1:
        raise ConfigError(
            f"zeros must lie in [1, {maxq + 1}] for {bits}-bit v1, found [{lo}, {hi}]"
        )
    return zeros - 1


def _fp16_scales(scales: Tensor) -> Tensor:
    """Scales as float16, refusing any change of value: the file must decode to what was tested."""
    if not torch.isfinite(scales).all():
        raise NonFiniteError("scales contain NaN or Inf")
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all():
        raise NonFiniteError("scales overflow float16 (|scale| > 65504)")
    if scales.dtype != torch.float16 and not torch.equal(half.to(scales.dtype), scales):
        raise ConfigError(
            f"scales ({scales.dtype}) are not exactly representable in float16; the quantizer "
            "must round scales to float16 before computing the integer weights"
        )
    return half.contiguous()


# ---------------------------------------------------------------------------------------------
# reader side: problems are in the file, so they are CheckpointError


def _require(
    tensors: dict[str, Tensor], key: str, where: str, *, dims: int, dtype: torch.dtype | None
) -> Tensor:
    if key not in tensors:
        raise CheckpointError(f"{where}{key} is missing (found keys: {sorted(tensors)})")
    t = tensors[key]
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"{where}{key}: expected dtype {dtype}, found {t.dtype}")
    if t.dim() != dims:
        raise CheckpointError(f"{where}{key}: expected a {dims}-D tensor, found shape {list(t.shape)}")
    return t


def _checked_dims(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, where: str
) -> tuple[int, int, int]:
    """(K, N, G) implied by qweight/scales, after checking all three shapes agree."""
    rows, N = qweight.shape
    if rows % bits != 0:
        # 32 input channels fill exactly `bits` words, so rows = K*bits/32 is a multiple of bits.
        raise CheckpointError(
            f"{where}qweight: {rows} rows is not K*{bits}/32 for any K that is a multiple of 32 "
            f"(expected a multiple of {bits} rows for {bits}-bit)"
        )
    K = rows * 32 // bits
    G = scales.shape[0]
    if list(scales.shape) != [G, N] or G < 1:
        raise CheckpointError(
            f"{where}scales: expected shape [G, {N}] (N from qweight), found {list(scales.shape)}"
        )
    if N % 32 != 0:
        raise CheckpointError(
            f"{where}qweight: N={N} output features is not a multiple of 32, so qzeros cannot be "
            "packed in the GPTQ layout"
        )
    expected = [G, N * bits // 32]
    if list(qzeros.shape) != expected:
        raise CheckpointError(
            f"{where}qzeros: expected shape {expected} (G from scales, N*{bits}/32), "
            f"found {list(qzeros.shape)}"
        )
    return K, N, G


def _g_idx(
    g_idx: Tensor | None, K: int, G: int, group_size: int | None, where: str, device: torch.device
) -> Tensor:
    """The [K] int32 group index: the file's, validated, or k // group_size when it is absent."""
    if g_idx is None:
        if group_size is None:
            raise CheckpointError(f"{where}g_idx is missing and no group_size was given to derive it")
        gs = K if group_size == -1 else group_size
        if gs <= 0:
            raise CheckpointError(f"{where}g_idx: group_size must be -1 or positive, got {group_size}")
        if G != -(-K // gs):
            raise CheckpointError(
                f"{where}scales: expected ceil({K}/{gs}) = {-(-K // gs)} groups for group_size "
                f"{group_size}, found {G}"
            )
        return (torch.arange(K, device=device) // gs).to(torch.int32)
    if g_idx.dtype.is_floating_point or g_idx.dtype.is_complex or g_idx.dtype == torch.bool:
        raise CheckpointError(f"{where}g_idx: expected an integer dtype (int32), found {g_idx.dtype}")
    if list(g_idx.shape) != [K]:
        raise CheckpointError(
            f"{where}g_idx: expected shape [{K}] (K from qweight), found {list(g_idx.shape)}"
        )
    if K:
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= G:
            raise CheckpointError(
                f"{where}g_idx: values must lie in [0, {G - 1}] ({G} groups in scales), "
                f"found [{lo}, {hi}]"
            )
    return g_idx.to(torch.int32)


def _read_scales(scales: Tensor, where: str) -> Tensor:
    """float16 scales; other float dtypes are accepted only when float16 holds them exactly."""
    if not scales.dtype.is_floating_point:
        raise CheckpointError(f"{where}scales: expected dtype torch.float16, found {scales.dtype}")
    if scales.dtype == torch.float16:
        return scales
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        raise CheckpointError(
            f"{where}scales: expected float16, found {scales.dtype} values that float16 cannot "
            "hold exactly"
        )
    return half
