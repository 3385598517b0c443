"""Packed-weight matmuls for QuantLinear on CPU: the weight stays packed, nothing dense is kept.

`pack_for_cpu(tensors, bits, group_size, fmt)` turns one GPTQ Linear's checkpoint tensors into the
fastest form this CPU and the layer's settings allow; each form is a small nn.Module whose forward
computes x @ W.T (no bias):

  Int4Kernel   bits <= 4 (2/3-bit codes fit the 4-bit kernel exactly). Decode rows go through
               torch's `_weight_int4pack_mm_for_cpu` (bf16 activations, bf16 scale/offset pairs);
               many rows (prefill, evaluation) dequantize bounded tiles of W exactly in the
               activation dtype and run one dense GEMM per tile, which is 3-5x faster there
               (bench/kernels.py). 2/3-bit layers are held at 4-bit storage: a 2-bit model is
               resident at 2x its file size, and a decode row costs 0.05-0.2 ms per Linear
               instead of 7-60 ms on the tiled path.
  Int8Kernel   8-bit with one group per row (group_size -1): `_weight_int8pack_mm` for decode
               rows (an asymmetric zero becomes a rank-1 correction), exact dequant for many rows.
  TiledKernel  everything else (8-bit with groups, group sizes not a multiple of 32, unusual
               g_idx, CPUs whose int4 layout we cannot read): the GPTQ tensors as stored, and
               exact dequantization of bounded column tiles per call.

Kernel-specific packing depends on the ISA (AVX-512 and AVX2 interleave differently), so it is
done at load time and never serialized; `quantized_weight()` reconstructs the checkpoint weight
bit for bit from any form. Shapes: x [M, K] -> y [M, N]; W is [N, K] (out, in).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantpress.formats.gptq_tensors import CheckpointFormat, from_gptq_tensors
from quantpress.quant.qweight import QuantizedWeight

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
KERNEL_DTYPE = torch.bfloat16  # the int4/int8 ops are vectorized for bf16 only (fp16/fp32: scalar, ~30x slower)
# Rows from which exact tile dequantization + dense GEMM beats the int4 kernel, per activation
# dtype (bench/kernels.py, SmolLM2's and the 168M model's shapes, 1 thread: the kernel's cost grows
# linearly with M while a tile's dequantization costs the same at any M; bf16 GEMMs run on AMX).
DENSE_MIN_ROWS = {torch.bfloat16: 128, torch.float16: 128, torch.float32: 256}
TILE_ELEMENTS = 1 << 22  # weights dequantized at once: 16 MiB of fp32 temporaries per tile


@dataclass(frozen=True)
class Int4Layout:
    """How `_convert_weight_to_int4pack_for_cpu` arranges [N, K] codes on this CPU.

    Rows are packed in blocks of `block` rows; a block is stored as [K, block/2] bytes, and the
    byte j of a column holds two rows: (j, j + block/2) when `halves` (AVX-512: 64, AVX2: 32),
    (2j, 2j + 1) otherwise (the scalar build: 16). Learned from a probe, not assumed."""

    block: int
    halves: bool

    def unpack(self, packed: Tensor, k: int) -> Tensor:
        """uint8 [n, K/2] in this layout (n a multiple of `block`) -> codes [n, K] uint8."""
        n = packed.shape[0]
        b = packed.view(n // self.block, k, self.block // 2)  # (blocks, K, bytes)
        pair = (b & 15, b >> 4)
        codes = torch.cat(pair, -1) if self.halves else torch.stack(pair, -1).flatten(2)
        return codes.transpose(1, 2).reshape(n, k)  # (blocks, K, block) -> (blocks, block, K)


_CANDIDATE_LAYOUTS = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(16, False))


@functools.cache
def int4_layout() -> Int4Layout | None:
    """This process's int4pack layout, or None when the op is missing or packs in a way none of
    the known layouts reproduces (then every layer takes the tiled path: correct, slower)."""
    k, n = 64, 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    except (AttributeError, RuntimeError):
        return None
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
        return None
    for layout in _CANDIDATE_LAYOUTS:
        if torch.equal(layout.unpack(packed, k).int(), codes):
            return layout
    return None


def pack_for_cpu(tensors: dict[str, Tensor], bits: int, group_size: int, fmt: CheckpointFormat,
                 *, exact: bool = False) -> nn.Module:
    """The fastest form of one quantized Linear for this CPU (see the module docstring).
    `tensors` are its checkpoint tensors (qweight, qzeros, scales, g_idx). `exact` never takes
    the bf16 kernels: every call dequantizes exactly, so outputs equal F.linear on the
    dequantized weight bit for bit (the fake-quantized model's own GEMM), at prefill speed."""
    qw = from_gptq_tensors(tensors, bits, fmt)
    n, k = qw.shape
    perm, groups_ok = _act_order(qw.g_idx, group_size, k)
    layout = int4_layout()
    if qw.bits <= 4 and groups_ok and layout is not None:
        kernel_gs = _int4_group_size(k, group_size)
        if kernel_gs is not None:
            return Int4Kernel(qw, group_size, kernel_gs, perm, layout, exact)
    if qw.bits == 8 and qw.num_groups == 1:
        return Int8Kernel(qw, exact)
    return TiledKernel(tensors, bits, fmt)


def _act_order(g_idx: Tensor, group_size: int, k: int) -> tuple[Tensor | None, bool]:
    """(permutation making every group contiguous or None if already trivial, whether the groups
    then are the plain k // group_size ranges the kernels can express)."""
    gs = k if group_size == -1 else group_size
    trivial = torch.arange(k, dtype=torch.int32) // gs
    g = g_idx.to(torch.int32)
    if torch.equal(g, trivial):
        return None, True
    perm = torch.argsort(g, stable=True)
    return perm, torch.equal(g[perm], trivial)  # act-order: each group keeps exactly gs members


def _int4_group_size(k: int, group_size: int) -> int | None:
    """The largest kernel group size that tiles both K and the checkpoint's groups exactly (a
    group of 128 is two kernel groups of 64 with equal scales; -1 is one group spanning K)."""
    span = math.gcd(k, k if group_size == -1 else group_size)
    return next((g for g in INT4_GROUP_SIZES if span % g == 0), None)


def _rows_for_kernel(x: Tensor, exact: bool) -> bool:
    return not exact and x.shape[0] < DENSE_MIN_ROWS.get(x.dtype, 64)


def tile_rows(k: int, align: int) -> int:
    """Output rows per dequantized tile: TILE_ELEMENTS weights, a multiple of `align`."""
    return max(align, TILE_ELEMENTS // k // align * align)


class Int4Kernel(nn.Module):
    def __init__(self, qw: QuantizedWeight, group_size: int, kernel_gs: int, perm: Tensor | None,
                 layout: Int4Layout, exact: bool) -> None:
        super().__init__()
        self.exact = exact
        n, k = qw.shape
        self.n, self.k, self.bits, self.group_size, self.kernel_gs = n, k, qw.bits, group_size, kernel_gs
        self.layout = layout
        self.n_pad = n_pad = -(-n // layout.block) * layout.block  # pad rows: code 0, scale 0 -> output 0
        codes = qw.intweight if perm is None else qw.intweight[:, perm]  # [N, K], groups contiguous
        codes = nn.functional.pad(codes.to(torch.int32), (0, 0, 0, n_pad - n))
        # per kernel group: the checkpoint group it belongs to, in permuted column order
        owner = (torch.arange(k // kernel_gs) * kernel_gs) // (k if group_size == -1 else group_size)
        scales = nn.functional.pad(qw.scales[owner].to(torch.float16), (0, n_pad - n))  # [Gk, Np]
        zeros = nn.functional.pad(qw.zeros[owner].to(torch.int16), (0, n_pad - n))  # [Gk, Np]
        s = scales.float()
        # The kernel computes (q - 8)·s + offset. With codes re-centred as q - z + 8 the offset is
        # 0 and every term stays small; that fits the nibble whenever z is 8 (4-bit sym) and for
        # every 2/3-bit code. Otherwise (q - z)·s == (q - 8)·s + (8 - z)·s (reference §2.1): at
        # 2 bits that form loses ~3% to bf16 (offsets 6x the weights), centred codes ~0.3%.
        zero_cols = zeros.t().repeat_interleave(kernel_gs, dim=1).int()  # [Np, K], packed order
        centred = codes - zero_cols + 8
        self.centred = bool(((centred >= 0) & (centred <= 15)).all())
        if self.centred:
            codes = centred
        offsets = torch.stack([s, torch.zeros_like(s) if self.centred else (8 - zeros.float()) * s], -1)
        offsets = offsets.to(KERNEL_DTYPE).contiguous()
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
        self.register_buffer("scale_offsets", offsets, persistent=False)  # [Gk, Np, 2] bf16
        self.register_buffer("scales", scales, persistent=False)  # exact fp16, for dequantization
        self.register_buffer("zeros", zeros, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse_perm", None if perm is None else torch.argsort(perm), persistent=False)
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x [M, K] -> [M, N]
        if _rows_for_kernel(x, self.exact):
            if self.perm is not None:
                x = x[:, self.perm]  # act-order: columns in the order the codes were packed
            y = torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), self.packed,
                                                  self.kernel_gs, self.scale_offsets)
            return y[:, : self.n].to(x.dtype)
        y = tiled_linear(x, self.n_pad, tile_rows(self.k, self.layout.block), self.dequantized_in_order)
        return y[:, : self.n]

    def dequantized_in_order(self, n0: int, n1: int, dtype: torch.dtype) -> Tensor:
        """Exact W[n0:n1] with columns back in checkpoint order, so the GEMM is the
        fake-quantized model's own, bit for bit (gathering x instead would sum in another order)."""
        w = self.dequantized(n0, n1, dtype)
        return w if self.perm is None else w[:, self.inverse_perm]

    def dequantized(self, n0: int, n1: int, dtype: torch.dtype) -> Tensor:
        """Exact W[n0:n1] [n, K] in `dtype` (columns in packed order), computed as
        QuantizedWeight.dequantize does: (q - z) in float, times the fp16 scale in float."""
        codes = self.layout.unpack(self.packed[n0:n1], self.k)  # [n, K] uint8
        q = codes.view(n1 - n0, self.k // self.kernel_gs, self.kernel_gs).to(dtype)  # [n, Gk, gs]
        s = self.scales[:, n0:n1].t().to(dtype)[..., None]  # [n, Gk, 1]
        z = 8 if self.centred else self.zeros[:, n0:n1].t().to(dtype)[..., None]  # q - z exactly, as stored
        return (q - z).mul_(s).view(n1 - n0, self.k)

    def quantized_weight(self) -> QuantizedWeight:
        codes = self.layout.unpack(self.packed, self.k)[: self.n].int()  # [N, K] packed order
        if self.centred:
            codes = codes - 8 + self.zeros[:, : self.n].t().repeat_interleave(self.kernel_gs, dim=1)
        if self.perm is not None:
            codes = codes[:, self.inverse_perm]
        per_group = (self.k if self.group_size == -1 else self.group_size) // self.kernel_gs
        first = slice(None, None, per_group)  # each checkpoint group's first kernel group
        return QuantizedWeight(codes, self.scales[first, : self.n].clone(),
                               self.zeros[first, : self.n].int(), self.g_idx.clone(), self.bits)


class Int8Kernel(nn.Module):
    """8-bit, one group per output row: int8 = q - 128, so W = s·int8 + (128 - z)·s."""

    def __init__(self, qw: QuantizedWeight, exact: bool) -> None:
        super().__init__()
        self.n, self.k = qw.shape
        self.exact = exact
        s, z = qw.scales[0].to(torch.float16), qw.zeros[0].to(torch.int16)  # [N]
        self.register_buffer("weight", (qw.intweight - 128).to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("scales", s, persistent=False)  # exact fp16, for dequantization
        self.register_buffer("kernel_scales", s.to(KERNEL_DTYPE), persistent=False)  # what the op takes
        self.register_buffer("zeros", z, persistent=False)
        offset = (128 - z.float()) * s.float()
        self.register_buffer("offset", offset if bool((z != 128).any()) else None, persistent=False)
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x [M, K] -> [M, N]
        if _rows_for_kernel(x, self.exact):
            xk = x.to(KERNEL_DTYPE).contiguous()
            y = torch._weight_int8pack_mm(xk, self.weight, self.kernel_scales)
            if self.offset is not None:  # asym: x·(128 - z)·s, a rank-1 term, summed in fp32
                y = y.float() + x.float().sum(-1, keepdim=True) * self.offset
            return y.to(x.dtype)
        return tiled_linear(x, self.n, tile_rows(self.k, 1), self.dequantized)

    def dequantized(self, n0: int, n1: int, dtype: torch.dtype) -> Tensor:
        q = self.weight[n0:n1].to(dtype) + 128  # exact: integers below 2^8
        return (q - self.zeros[n0:n1, None].to(dtype)) * self.scales[n0:n1, None].to(dtype)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight.int() + 128, self.scales[None].clone(), self.zeros[None].int(),
                               self.g_idx.clone(), 8)


class TiledKernel(nn.Module):
    """The checkpoint tensors as stored; columns dequantized a tile at a time."""

    _ALIGN = 32  # qzeros pack 32 columns into `bits` words, so tiles start on multiples of 32

    def __init__(self, tensors: dict[str, Tensor], bits: int, fmt: CheckpointFormat) -> None:
        super().__init__()
        self.k, self.n = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
        self.bits, self.fmt = bits, fmt
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(key, tensors[key], persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x [M, K] -> [M, N]
        return tiled_linear(x, self.n, tile_rows(self.k, self._ALIGN), self.dequantized)

    def dequantized(self, n0: int, n1: int, dtype: torch.dtype) -> Tensor:
        words = slice(n0 * self.bits // 32, n1 * self.bits // 32)
        tile = {"qweight": self.qweight[:, n0:n1], "qzeros": self.qzeros[:, words],
                "scales": self.scales[:, n0:n1], "g_idx": self.g_idx}
        return from_gptq_tensors(tile, self.bits, self.fmt).dequantize().to(dtype)

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return from_gptq_tensors(tensors, self.bits, self.fmt)


def tiled_linear(x: Tensor, n: int, tile: int, dequantized, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ W.T (+ bias), W [N, K] dequantized `tile` rows at a time (bounded temporaries).
    One tile is exactly F.linear(x, W, bias): the same GEMM the fake-quantized model runs."""
    if tile >= n:
        return F.linear(x, dequantized(0, n, x.dtype), bias)
    y = x.new_empty(x.shape[0], n)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        y[:, n0:n1] = F.linear(x, dequantized(n0, n1, x.dtype), None if bias is None else bias[n0:n1])
    return y
