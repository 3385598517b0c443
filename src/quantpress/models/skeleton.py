"""Building transformers models without allocating their weights.

Models are instantiated on the `meta` device (no memory, no random init). Weights are then
attached per module with `load_state_dict(assign=True)` — one decoder layer at a time during
quantization, everything at once when loading for inference. Non-persistent buffers (the
rotary embedding's `inv_freq`) are not in any checkpoint: modules owning them are rebuilt on
CPU from the model config, which is how transformers computes them too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from quantpress.errors import CheckpointError, NonFiniteError, UnsupportedArchitecture


def hf_config(config: dict) -> PretrainedConfig:
    """A transformers config object from a config.json dict (quantization_config dropped:
    quantpress loads GPTQ weights itself and must not trigger transformers' GPTQ path)."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = config.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as e:
        raise UnsupportedArchitecture(f"transformers cannot build model_type {model_type!r}: {e}") from None


def build_on_meta(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The full causal LM with every parameter and buffer on `meta`, parameters in `dtype`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype,
                                                 trust_remote_code=False)
    model.eval()
    model.requires_grad_(False)
    return model


def materialize_buffers(model: nn.Module) -> None:
    """Rebuild, on CPU, each module that still owns a meta buffer (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not hasattr(module, "config"):
            raise UnsupportedArchitecture(f"cannot compute buffers of {name} ({type(module).__name__})")
        fresh = type(module)(config=module.config)
        model.set_submodule(name, fresh)


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str,
                   allow_missing: frozenset[str] = frozenset()) -> None:
    """Attach checkpoint tensors to a meta `module`, each converted to the dtype of the
    parameter/buffer it replaces (the module declares dtypes; e.g. GPTQ scales stay fp16).
    Every persistent tensor must be provided, except the names in `allow_missing`."""
    targets = module.state_dict(keep_vars=True)
    unexpected = sorted(set(state) - set(targets))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensors {unexpected[:5]}")
    missing = sorted(set(targets) - set(state) - allow_missing)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:5]}")
    converted = {}
    for key, tensor in state.items():
        target = targets[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{where}: {key} has shape {list(tensor.shape)}, expected {list(target.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{where}: tensor {key} contains NaN or Inf")
        converted[key] = tensor.to(target.dtype)
    module.load_state_dict(converted, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Drop a module's tensors back to `meta`, freeing their memory."""
    module.to("meta")


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the OS (`malloc_trim(0)`); a no-op elsewhere.

    Each decoder layer allocates and frees a few hundred MB of differently sized temporaries
    (activations, Hessians, GPTQ work arrays). glibc keeps freed chunks mapped for reuse, and
    fragmentation made the resident set creep up layer after layer (+150 MB over the 168M
    benchmark model's 8 layers); trimming once per layer keeps it flat, at ~1 ms per call.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory_small() -> None:
    """Have glibc hand freed memory back to the OS as it goes (a no-op off glibc). For a
    long-running server process only: the setting is process-wide.

    glibc raises its trim threshold as large blocks are freed, up to 64 MB left free but mapped
    in every arena. Each server validation thread tokenizing a 2 MB prompt went through blocks of
    tens of MB, and its arena then kept ~40 MB after every such request, which malloc_trim does
    not return for a thread's arena: the resident set never came back down. Setting the
    thresholds (which stops the adjustment) at 32 MB for mmap, the value the adjustment reaches
    anyway, and 8 MB kept free per arena bounds what stays.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim
    except OSError:
        return None
