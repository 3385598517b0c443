"""GPTQ bit packing: b-bit unsigned ints <-> int32 words, exact inverse pairs (spec A3).

One rule covers every width. Along the packed dimension the values are concatenated LSB-first
into a little-endian bitstream of 32-bit words: value j occupies stream bits [b*j, b*j + b),
and stream bit p is bit p % 32 of word p // 32. For b in {2, 4, 8} each word holds 32/b whole
values; for b = 3, 32 values fill exactly 3 words and values 10 and 21 of each block straddle a
word boundary. Words are stored reinterpreted as signed int32 (AutoGPTQ's `astype(np.int32)`).

qweight packs along K (rows of the [K, N] int weight); qzeros packs along N (columns of the
[G, N] zeros). Both are the same rule applied to a different axis.

The code works on blocks of 32 values (= `bits` words): one tensor op shifts every value into
its position, then each word sums its fields. Python loops run over the b words of a block,
never over elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantpress.errors import ConfigError

PACKABLE_BITS = (2, 3, 4, 8)
_BLOCK = 32  # values per block; a block of b-bit values fills exactly b words


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack [K, N] unsigned ints in [0, 2^bits) along K into [K*bits//32, N] int32 (qweight).

    Raises ConfigError if bits is unsupported, K is not a multiple of 32, the dtype is not an
    integer type, or a value is out of range.
    """
    _check_values(values, bits, axis_name="rows (K)")
    return _pack_dim0(values, bits)


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_rows`: [K*bits//32, N] int32 -> [K, N] int32 in [0, 2^bits)."""
    _check_packed(packed, bits, axis_name="rows")
    return _unpack_dim0(packed, bits)


def pack_cols(values: Tensor, bits: int) -> Tensor:
    """Pack [G, N] unsigned ints in [0, 2^bits) along N into [G, N*bits//32] int32 (qzeros)."""
    _check_values(values, bits, axis_name="columns (N)", dim=1)
    return _pack_dim0(values.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_cols`: [G, N*bits//32] int32 -> [G, N] int32 in [0, 2^bits)."""
    _check_packed(packed, bits, axis_name="columns", dim=1)
    return _unpack_dim0(packed.t(), bits).t().contiguous()


def _block_layout(bits: int) -> tuple[list[int], list[int]]:
    """Where each of the 32 values of a block starts: (its word, its bit shift in that word)."""
    starts = [bits * j for j in range(_BLOCK)]  # stream bit of each value's bit 0
    return [p // 32 for p in starts], [p % 32 for p in starts]


def _pack_dim0(values: Tensor, bits: int) -> Tensor:
    """[K, N] validated ints -> [K*bits//32, N] int32, packing along dim 0."""
    K, N = values.shape
    M = K // _BLOCK
    blocks = values.to(torch.int32).reshape(M, _BLOCK, N)  # (M, 32, N): M blocks of 32 rows
    word_of, shift_of = _block_layout(bits)
    shifts = torch.tensor(shift_of, dtype=torch.int32, device=blocks.device).view(1, _BLOCK, 1)
    # torch's << on int32 shifts the two's-complement bits (it shifts the unsigned
    # representation), so a field may land in bit 31 and a straddling field simply loses its
    # high bits here; they are added to the next word below as a carry.
    fields = blocks << shifts  # (M, 32, N), each value in its word position
    words = []
    for w in range(bits):
        j0, j1 = word_of.index(w), len(word_of) - 1 - word_of[::-1].index(w)
        # The fields of a word are disjoint, so their sum is their OR; it never overflows
        # because every field but the last sits strictly below the last one.
        word = fields[:, j0 : j1 + 1].sum(dim=1, dtype=torch.int32)  # (M, N)
        if w > 0 and shift_of[j0 - 1] + bits > 32:
            # 3-bit only: value j0-1 straddled into this word; its high bits start at bit 0.
            word += blocks[:, j0 - 1] >> (32 - shift_of[j0 - 1])
        words.append(word)
    return torch.stack(words, dim=1).reshape(M * bits, N)  # word w of block m is row m*bits + w


def _unpack_dim0(packed: Tensor, bits: int) -> Tensor:
    """[K*bits//32, N] int32 -> [K, N] int32, unpacking along dim 0."""
    rows, N = packed.shape
    M = rows // bits
    words = packed.reshape(M, bits, N)  # (M, bits, N)
    word_of, shift_of = _block_layout(bits)
    shifts = torch.tensor(shift_of, dtype=torch.int32, device=packed.device)
    # int32 >> is arithmetic, but masking right after the shift keeps exactly the field's own
    # bits, so the result equals a logical shift. A straddling field has only its (32 - shift)
    # low bits in its first word, hence the narrower mask there.
    widths = torch.clamp(32 - shifts, max=bits)
    masks = ((1 << widths) - 1).view(1, _BLOCK, 1)
    index = torch.tensor(word_of, device=packed.device)
    out = (words.index_select(1, index) >> shifts.view(1, _BLOCK, 1)) & masks  # (M, 32, N)
    for j in range(_BLOCK):
        spill = shift_of[j] + bits - 32  # bits of value j that live in the next word
        if spill > 0:
            out[:, j] |= (words[:, word_of[j] + 1] & ((1 << spill) - 1)) << (bits - spill)
    return out.reshape(M * _BLOCK, N)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in PACKABLE_BITS:
        raise ConfigError(f"bits must be one of {PACKABLE_BITS} for GPTQ packing, got {bits!r}")


def _check_values(values: Tensor, bits: int, *, axis_name: str, dim: int = 0) -> None:
    """Validate an unpacked [*, *] integer tensor about to be packed along `dim`."""
    _check_bits(bits)
    if values.dim() != 2:
        raise ConfigError(f"expected a 2-D tensor to pack, got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ConfigError(f"values to pack must have an integer dtype, got {values.dtype}")
    size = values.shape[dim]
    if size % _BLOCK != 0:
        # AutoGPTQ sizes buffers as `features // 32 * bits`: anything else is not a valid layout.
        raise ConfigError(
            f"GPTQ packs {axis_name} in blocks of {_BLOCK}; got {size}, not a multiple of {_BLOCK}"
        )
    if values.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(values))  # one pass over the tensor
    if lo < 0 or hi >= 1 << bits:
        raise ConfigError(
            f"values to pack must lie in [0, {(1 << bits) - 1}] for {bits}-bit, "
            f"found range [{lo}, {hi}]"
        )


def _check_packed(packed: Tensor, bits: int, *, axis_name: str, dim: int = 0) -> None:
    """Validate a packed int32 tensor about to be unpacked along `dim`."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ConfigError(f"expected a 2-D packed tensor, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.int32:
        raise ConfigError(f"packed GPTQ tensors must be int32, got {packed.dtype}")
    size = packed.shape[dim]
    if size % bits != 0:
        # 32 values always fill exactly `bits` words, so a valid packed axis is a multiple of bits.
        raise ConfigError(
            f"packed {axis_name} must be a multiple of {bits} ({bits} words per 32 values) "
            f"for {bits}-bit, got {size}"
        )
