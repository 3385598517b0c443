"""QuantLinear: a Linear whose weight lives in the GPTQ packed layout.

The buffers are the checkpoint tensors themselves (`qweight`, `qzeros`, `scales`, `g_idx`,
`bias`), so `load_state_dict` fills it straight from a GPTQ file and memory holds the packed
weight. Forward dequantizes to the activation dtype and calls F.linear: on CPU there is no
fused int kernel to win with, and exact dequantization keeps logits bit-identical to the
quantizer's fake-quant model. The dense weight is built on the first forward and kept (unpacking
every call made evaluation ~10x slower than the dense model); `load_state_dict` drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantpress.formats.gptq_tensors import CheckpointFormat, from_gptq_tensors
from quantpress.quant.qweight import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 fmt: CheckpointFormat, bias: bool, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.fmt = bits, group_size, fmt
        groups = -(-in_features // (in_features if group_size == -1 else group_size))  # ceil
        kw = {"device": device}
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.empty(groups, out_features * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, **kw))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16, **kw) if bias else None)
        self._dense: tuple[Tensor, Tensor | None] | None = None  # (weight, bias) in the last x.dtype

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return from_gptq_tensors(tensors, self.bits, self.fmt)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in_features)
        if self._dense is None or self._dense[0].dtype != x.dtype:
            weight = self.quantized_weight().dequantize().to(x.dtype)  # [out, in], exact in fp32
            self._dense = (weight, None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, *self._dense)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dense = None  # new packed tensors: the cached dense weight is stale
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.fmt.value}")


def swap_linears(model: nn.Module, names: list[str], bits: int, group_size: int, fmt: CheckpointFormat) -> None:
    """Replace the named nn.Linear modules (typically on `meta`) with QuantLinear shells."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected nn.Linear")
        model.set_submodule(name, QuantLinear(
            linear.in_features, linear.out_features, bits, group_size, fmt,
            bias=linear.bias is not None, device=linear.weight.device,
        ))
