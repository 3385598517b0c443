"""The result of quantizing one Linear weight, before bit packing."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weights plus per-group parameters, in GPTQ checkpoint orientation.

    For a Linear with weight W of shape [N, K] (out, in) and G groups:
      intweight [N, K] int32 in [0, 2^bits - 1], input channels in their ORIGINAL order
      scales    [G, N] float16 (the stored precision; the quantizer already rounded to it)
      zeros     [G, N] int32, the true integer zero point (no v1 "-1"): in [0, 2^bits - 1] when
                quantpress quantizes; a v1 file whose stored field is all ones decodes to 2^bits,
                exactly as AutoGPTQ/ExLlama/vLLM decode it
      g_idx     [K]    int32, the group of each input channel (non-monotonic under act-order)
    Dequantization, as every GPTQ consumer computes it (spec A2):
      W[n, k] = scales[g_idx[k], n] * (intweight[n, k] - zeros[g_idx[k], n])
    """

    intweight: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int

    def dequantize(self) -> Tensor:
        """[N, K] float32; bit-identical to the fake-quantized weight the GPTQ loop produced."""
        g = self.g_idx.long()
        # Gather along the last dim of the [N, G] transposes: same values as scales[g].t(), ~4x faster.
        scale = self.scales.float().t()[:, g]  # [N, K]
        zero = self.zeros.t()[:, g]  # [N, K]
        return scale * (self.intweight - zero).float()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.intweight.shape)  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])
