"""QuantLinear: a Linear whose weight stays packed; forward runs a CPU int kernel.

A QuantLinear is built with the checkpoint's own buffers (`qweight`, `qzeros`, `scales`,
`g_idx`, `bias`), so `load_state_dict` (or the loader's assignment) fills it straight from a GPTQ
file. `pack()` then converts them into the fastest form this CPU supports (runtime/kernels.py:
the int4 or int8 weight-only kernel for decode rows, exact tile dequantization for many rows) and
drops the checkpoint buffers, so memory holds one packed copy and never a dense weight. The
loader packs every layer as it loads; a module used before `pack()` packs itself on its first
forward. Packing is ISA-specific, so a packed module is for inference only: its state_dict keeps
just the bias, and `quantized_weight()` gives back the checkpoint weight exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantpress.formats.gptq_tensors import CheckpointFormat, from_gptq_tensors
from quantpress.models.skeleton import return_freed_memory
from quantpress.quant.qweight import QuantizedWeight
from quantpress.runtime.kernels import pack_for_cpu

CHECKPOINT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")


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
        self.kernel: nn.Module | None = None  # set by pack()

    @property
    def packed(self) -> bool:
        return self.kernel is not None

    def pack(self, *, exact: bool = False) -> None:
        """Replace the checkpoint buffers by this CPU's kernel form (a no-op once packed).
        `exact`: see kernels.pack_for_cpu."""
        if self.kernel is not None:
            return
        tensors = {key: getattr(self, key) for key in CHECKPOINT_BUFFERS}
        self.kernel = pack_for_cpu(tensors, self.bits, self.group_size, self.fmt, exact=exact)
        for key in CHECKPOINT_BUFFERS:
            delattr(self, key)  # the kernel holds what it needs; TiledKernel shares these tensors

    def quantized_weight(self) -> QuantizedWeight:
        if self.kernel is not None:
            return self.kernel.quantized_weight()
        tensors = {key: getattr(self, key) for key in CHECKPOINT_BUFFERS}
        return from_gptq_tensors(tensors, self.bits, self.fmt)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in_features)
        self.pack()
        y = self.kernel(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        if self.kernel is not None:
            raise RuntimeError("a packed QuantLinear is inference-only; build a new one to load new weights")
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        kernel = type(self.kernel).__name__ if self.kernel is not None else "unpacked"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, format={self.fmt.value}, kernel={kernel}")


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


def pack_all(model: nn.Module, *, exact: bool = False) -> None:
    """Pack every QuantLinear of a loaded model, freeing each one's checkpoint buffers in turn.

    Packing goes through int32 temporaries of 4 bytes per weight; glibc keeps such freed blocks
    mapped, and a 26M-parameter model's resident set grew 105 MiB for 14 MiB of weights until
    the heap is trimmed after each module (~1 ms each)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.pack(exact=exact)
            return_freed_memory()
