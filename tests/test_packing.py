"""GPTQ bit packing against an independent bit-by-bit reference of spec A3."""

from __future__ import annotations


import pytest
import torch

from quantpress.errors import ConfigError
from quantpress.formats.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

BITS = (2, 3, 4, 8)


# --- slow, obviously-correct reference: the LSB-first bitstream built bit by bit ---------------


def _to_int32(word: int) -> int:
    """An unsigned 32-bit word as the signed int32 the checkpoint stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _ref_pack_line(values: list[int], bits: int) -> list[int]:
    """Value j occupies stream bits [bits*j, bits*j + bits); stream bit p is bit p%32 of word p//32."""
    words = [0] * (len(values) * bits // 32)
    for j, v in enumerate(values):
        for i in range(bits):
            if (v >> i) & 1:
                p = bits * j + i
                words[p // 32] |= 1 << (p % 32)
    return [_to_int32(w) for w in words]


def _ref_unpack_line(words: list[int], bits: int) -> list[int]:
    n = len(words) * 32 // bits
    out = []
    for j in range(n):
        v = 0
        for i in range(bits):
            p = bits * j + i
            v |= (((words[p // 32] & 0xFFFFFFFF) >> (p % 32)) & 1) << i
        out.append(v)
    return out


def _ref_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    cols = [_ref_pack_line(values[:, n].tolist(), bits) for n in range(values.shape[1])]
    return torch.tensor(cols, dtype=torch.int32).t()


def _ref_pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    rows = [_ref_pack_line(values[g].tolist(), bits) for g in range(values.shape[0])]
    return torch.tensor(rows, dtype=torch.int32)


def _random_values(shape: tuple[int, int], bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32)


# --- bit-exact agreement with the reference ------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_bitstream_reference(bits: int) -> None:
    values = _random_values((96, 7), bits, seed=bits)  # 3 blocks of 32 rows, odd N
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (96 * bits // 32, 7)
    assert torch.equal(packed, _ref_pack_rows(values, bits))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_rows_reads_reference_words(bits: int) -> None:
    values = _random_values((64, 5), bits, seed=10 + bits)
    reference = _ref_pack_rows(values, bits)
    assert torch.equal(unpack_rows(reference, bits), values)
    # and the reference reader agrees with the reference writer (the two references are inverses)
    assert _ref_unpack_line(reference[:, 0].tolist(), bits) == values[:, 0].tolist()


@pytest.mark.parametrize("bits", BITS)
def test_pack_cols_matches_bitstream_reference(bits: int) -> None:
    values = _random_values((3, 64), bits, seed=20 + bits)
    packed = pack_cols(values, bits)
    assert packed.shape == (3, 64 * bits // 32)
    assert packed.is_contiguous()
    assert torch.equal(packed, _ref_pack_cols(values, bits))
    assert torch.equal(unpack_cols(packed, bits), values)


# --- hand-written layouts from spec A3 -----------------------------------------------------------


def _three_bit_block(assignments: dict[int, int], blocks: int = 1) -> torch.Tensor:
    """[32*blocks, 1] 3-bit values, zero except `assignments` (row -> value)."""
    values = torch.zeros(32 * blocks, 1, dtype=torch.int32)
    for row, v in assignments.items():
        values[row, 0] = v
    return values


def test_3bit_value_10_straddles_word0_and_word1() -> None:
    # value i+10 = 0b101: bits[1:0] = 01 go to word0 bits 30-31, bit2 = 1 to word1 bit 0
    words = pack_rows(_three_bit_block({10: 0b101}), 3)[:, 0].tolist()
    assert words == [1 << 30, 1, 0]
    # 0b011: word0 bits 30 and 31 -> the sign bit is set, word1 bit 0 stays clear
    words = pack_rows(_three_bit_block({10: 0b011}), 3)[:, 0].tolist()
    assert words == [_to_int32(0b11 << 30), 0, 0]


def test_3bit_value_21_straddles_word1_and_word2() -> None:
    # value i+21 = 0b011: bit0 goes to word1 bit 31, bits[2:1] = 01 to word2 bits 0-1
    words = pack_rows(_three_bit_block({21: 0b011}), 3)[:, 0].tolist()
    assert words == [0, _to_int32(1 << 31), 0b01]
    words = pack_rows(_three_bit_block({21: 0b110}), 3)[:, 0].tolist()
    assert words == [0, 0, 0b11]


@pytest.mark.parametrize(
    ("row", "value", "expected"),
    [
        (0, 0b111, [0b111, 0, 0]),  # word0: values 0..9 at bits 3t
        (9, 0b101, [0b101 << 27, 0, 0]),
        (11, 0b111, [0, 0b111 << 1, 0]),  # word1: values 11..20 at bits 3t+1
        (20, 0b110, [0, 0b110 << 28, 0]),
        (22, 0b111, [0, 0, 0b111 << 2]),  # word2: values 22..31 at bits 3t+2
        (31, 0b111, [0, 0, _to_int32(0b111 << 29)]),
    ],
)
def test_3bit_whole_fields(row: int, value: int, expected: list[int]) -> None:
    assert pack_rows(_three_bit_block({row: value}), 3)[:, 0].tolist() == expected


def test_3bit_second_block_uses_word_rows_3_to_5() -> None:
    packed = pack_rows(_three_bit_block({32 + 10: 0b101, 32 + 21: 0b011}, blocks=2), 3)
    assert packed.shape == (6, 1)
    assert packed[:, 0].tolist() == [0, 0, 0, 1 << 30, 1 + _to_int32(1 << 31), 0b01]


def test_4bit_row_8r_lands_in_bits_0_to_3() -> None:
    values = torch.zeros(32, 2, dtype=torch.int32)
    values[8, 0] = 0xA  # k = 8r with r = 1 -> word row 1, nibble 0
    values[15, 0] = 0x3  # k = 8r + 7 -> nibble 7 (bits 28-31)
    values[16, 1] = 0x5  # k = 8*2 -> word row 2, nibble 0, column 1
    packed = pack_rows(values, 4)
    assert packed.shape == (4, 2)
    assert packed[:, 0].tolist() == [0, 0x3000000A, 0, 0]
    assert packed[:, 1].tolist() == [0, 0, 0x5, 0]


def test_words_are_reinterpreted_as_signed_int32() -> None:
    all_ones = {bits: torch.full((32, 1), (1 << bits) - 1, dtype=torch.int32) for bits in BITS}
    for bits, values in all_ones.items():
        assert set(pack_rows(values, bits).flatten().tolist()) == {-1}, bits
    top = torch.zeros(32, 1, dtype=torch.int32)
    top[7, 0] = 0x8  # 4-bit nibble 7 = bit 31 only
    assert pack_rows(top, 4)[0, 0].item() == -(2**31)
    top[7, 0] = 0xF
    assert pack_rows(top, 4)[0, 0].item() == _to_int32(0xF0000000) == -268435456


def test_unpack_uses_logical_shifts_on_negative_words() -> None:
    # an arithmetic shift without masking would smear the sign bit into the top fields
    sign = -(2**31)  # 0x80000000: only bit 31 set
    four_words = torch.full((4, 1), sign, dtype=torch.int32)
    assert unpack_rows(four_words, 4)[:, 0].tolist() == ([0] * 7 + [8]) * 4
    two_words = torch.full((2, 1), sign, dtype=torch.int32)
    assert unpack_rows(two_words, 2)[:, 0].tolist() == ([0] * 15 + [2]) * 2
    expected = [0] * 32
    expected[10] = 0b010  # stream bit 31 is bit 1 of value 10
    expected[21] = 0b001  # stream bit 63 is bit 0 of value 21
    expected[31] = 0b100  # stream bit 95 is bit 2 of value 31
    three_words = torch.full((3, 1), sign, dtype=torch.int32)
    assert unpack_rows(three_words, 3)[:, 0].tolist() == expected


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_round_trip_any_int_dtype(bits: int, dtype: torch.dtype) -> None:
    values = _random_values((128, 64), bits, seed=bits).to(dtype)
    assert torch.equal(unpack_rows(pack_rows(values, bits), bits), values.to(torch.int32))
    assert torch.equal(unpack_cols(pack_cols(values, bits), bits), values.to(torch.int32))


def test_pack_accepts_non_contiguous_views() -> None:
    values = _random_values((64, 96), 4, seed=3)
    assert torch.equal(pack_rows(values.t(), 4), pack_rows(values.t().contiguous(), 4))
    assert torch.equal(pack_cols(values[:, ::1].t().t(), 4), pack_cols(values, 4))


def test_full_size_matrix_round_trips() -> None:
    # A Llama-7B MLP matrix: int32 overflow or a shape slip would show at this size, not at 64x96.
    values = _random_values((4096, 11008), 4, seed=0)
    assert torch.equal(unpack_rows(pack_rows(values, 4), 4), values)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_packed_dimension_must_be_multiple_of_32(bits: int) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 32, dtype=torch.int32), bits)
    with pytest.raises(ConfigError, match="multiple of 32"):
        pack_cols(torch.zeros(2, 40, dtype=torch.int32), bits)


@pytest.mark.parametrize("bad", [16, -1])
def test_out_of_range_values_are_refused(bad: int) -> None:
    values = torch.zeros(32, 1, dtype=torch.int32)
    values[5, 0] = bad
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        pack_rows(values, 4)
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        pack_cols(values.t().contiguous(), 4)


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16, True])
def test_unsupported_bits(bits: int) -> None:
    with pytest.raises(ConfigError, match="bits"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int32), bits)
    with pytest.raises(ConfigError, match="bits"):
        unpack_rows(torch.zeros(4, 1, dtype=torch.int32), bits)


def test_float_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="integer dtype"):
        pack_rows(torch.zeros(32, 1), 4)


def test_unpack_checks_packed_shape_and_dtype() -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        unpack_rows(torch.zeros(4, 1, dtype=torch.int32), 3)
    with pytest.raises(ConfigError, match="multiple of 3"):
        unpack_cols(torch.zeros(1, 4, dtype=torch.int32), 3)
    with pytest.raises(ConfigError, match="int32"):
        unpack_rows(torch.zeros(4, 1, dtype=torch.int64), 4)
    with pytest.raises(ConfigError, match="2-D"):
        unpack_rows(torch.zeros(4, dtype=torch.int32), 4)
