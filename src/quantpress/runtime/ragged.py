"""One forward over many sequences of different lengths, each with its own KV cache.

The new tokens of all sequences are packed into a single row (`input_ids` [1, T]) with each
token's own position id, so every Linear, norm and the MLP see one [T, hidden] matrix and read
their weights once per step. Only attention is per sequence: transformers' attention modules
call the function registered under `RAGGED_ATTENTION`, which appends each sequence's new
keys/values to that sequence's cache and runs SDPA over that sequence alone. RoPE is right
because the model computes it from the per-token `position_ids` before attention.

A segment may be one decode token or a chunk of a prompt (several tokens continuing the cache),
so prefills and decode steps of different requests share one forward.

Why attention is not padded and batched: a sequence's attention output would then depend on the
longest sequence in the batch (SDPA's reduction blocks follow the padded length), so a request
would not produce the same tokens alone and under load. Per-sequence SDPA sees the same shapes
either way. The Linears are the other source of batch dependence, see `BATCH_INVARIANT_ROWS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quantpress.errors import UnsupportedArchitecture

RAGGED_ATTENTION = "quantpress_ragged"

# Why a forward's row count matters: MKL's fp32 GEMM picks its kernel (and, with several threads,
# how it splits the work) from the shapes, so a row's result changes in the last bits with the
# number of rows M. Measured on this project's CPU (AVX-512, MKL 2024.2): M=1, 2-15 and >=16 sum
# in different orders for every Linear shape from 256x128 to 4096x32000, and with 2 threads a
# 2048->512 projection switches again at M=57 (2048->2048 at M=257). So no range of M is safe in
# general, but a fixed M is: within one 16-row GEMM a row's result does not depend on its
# position (checked for 1 and 2 threads). Batch-invariant decoding therefore runs decode steps in
# groups of exactly BATCH_INVARIANT_ROWS rows (padded), and prompt chunks in forwards of their
# own, whose shapes depend on nothing but the sequence.
BATCH_INVARIANT_ROWS = 16
PAD_TOKEN = 0  # what padding rows feed the model; their outputs are discarded


class SequenceKV:
    """Keys and values of one sequence, per layer, in buffers grown by doubling up to `limit`.

    Buffers are [1, kv_heads, capacity, head_dim]; attention reads the view [:, :, :length].
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # prompt + max_new_tokens: the cache never needs more
        self.length = 0  # tokens whose keys/values are stored in every layer
        self._keys: dict[int, Tensor] = {}
        self._values: dict[int, Tensor] = {}

    def extend(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store `keys`/`values` [1, kv_heads, n, head_dim] after the committed tokens of `layer`;
        return views of all keys/values so far, [1, kv_heads, length + n, head_dim]."""
        end = self.length + keys.shape[2]
        if end > self.limit:
            raise RuntimeError(f"KV cache overflow: {end} tokens > limit {self.limit}")
        k_buf, v_buf = self._reserve(layer, keys, end)
        k_buf[:, :, self.length:end] = keys
        v_buf[:, :, self.length:end] = values
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def commit(self, n: int) -> None:
        """Every layer has stored `n` more tokens (called once the forward succeeded)."""
        self.length += n

    def release(self) -> None:
        self._keys.clear()
        self._values.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))

    def _reserve(self, layer: int, like: Tensor, needed: int) -> tuple[Tensor, Tensor]:
        k_buf = self._keys.get(layer)
        if k_buf is not None and k_buf.shape[2] >= needed:
            return k_buf, self._values[layer]
        old = 0 if k_buf is None else k_buf.shape[2]
        capacity = min(self.limit, max(needed, 2 * old, 64))
        shape = (1, like.shape[1], capacity, like.shape[3])
        new_k, new_v = like.new_empty(shape), like.new_empty(shape)
        if k_buf is not None:  # keep what is committed; the caller overwrites from self.length on
            new_k[:, :, :self.length] = k_buf[:, :, :self.length]
            new_v[:, :, :self.length] = self._values[layer][:, :, :self.length]
        self._keys[layer], self._values[layer] = new_k, new_v
        return new_k, new_v


@dataclass(frozen=True)
class Segment:
    """The new tokens of one sequence: columns [start, start + length) of the packed row."""

    kv: SequenceKV
    start: int
    length: int


@dataclass(frozen=True)
class RaggedBatch:
    segments: tuple[Segment, ...]


def install_ragged_attention(model: nn.Module) -> None:
    """Route the model's attention through `ragged_attention` (plain forwards still get SDPA).

    Registering is idempotent; it adds one entry to transformers' attention and mask tables.
    """
    ALL_ATTENTION_FUNCTIONS.register(RAGGED_ATTENTION, ragged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RAGGED_ATTENTION, sdpa_mask)
    if model.config._attn_implementation != RAGGED_ATTENTION:
        model.set_attn_implementation(RAGGED_ATTENTION)
    if model.config._attn_implementation != RAGGED_ATTENTION:  # transformers only warns
        raise UnsupportedArchitecture(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "which the batching engine needs")


def ragged_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, ragged: RaggedBatch | None = None, **kwargs,
) -> tuple[Tensor, None]:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] (RoPE applied)
    -> ([1, T, heads, head_dim], None), as transformers' attention functions return."""
    if ragged is None:  # an ordinary forward (e.g. prompt log-probabilities): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    window = kwargs.pop("sliding_window", None)
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])  # padding rows stay 0
    for seg in ragged.segments:
        cols = slice(seg.start, seg.start + seg.length)
        keys, values = seg.kv.extend(module.layer_idx, key[:, :, cols], value[:, :, cols])
        mask = _segment_mask(seg.length, keys.shape[2], window, query.device)
        out[:, cols], _ = sdpa_attention_forward(module, query[:, :, cols], keys, values, mask,
                                                 scaling=scaling, **kwargs)
    return out, None


def _segment_mask(q_len: int, kv_len: int, window: int | None, device: torch.device) -> Tensor | None:
    """None when SDPA's own rule is right (one query sees every key; a whole prompt is causal),
    else a bool mask [1, 1, q_len, kv_len] for queries at the last q_len positions."""
    windowed = window is not None and kv_len > window
    if not windowed and (q_len == 1 or q_len == kv_len):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= q_pos - k_pos < window
    return visible[None, None]


# A 4-D mask makes transformers skip building its own (ragged_attention ignores it).
def _no_mask(device: torch.device) -> Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


@torch.inference_mode()
def ragged_forward(model: nn.Module, tokens: list[list[int]], caches: list[SequenceKV], *, min_rows: int = 1) -> Tensor:
    """Run the new `tokens[i]` of every sequence i (continuing `caches[i]`) in one packed forward.

    Returns fp32 logits [n_sequences, vocab] for each sequence's last new token. The packed row and
    the lm_head's input are both padded to at least `min_rows` rows (see BATCH_INVARIANT_ROWS).
    """
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    for seq_tokens, kv in zip(tokens, caches, strict=True):
        segments.append(Segment(kv, len(ids), len(seq_tokens)))
        ids.extend(seq_tokens)
        positions.extend(range(kv.length, kv.length + len(seq_tokens)))
    pad = max(0, min_rows - len(ids))
    ids.extend([PAD_TOKEN] * pad)
    positions.extend([0] * pad)
    # Only each sequence's last token needs logits (a prompt's other rows would each cost a
    # vocab x hidden product for nothing); repeat the last index so the lm_head GEMM has >= min_rows
    last = [seg.start + seg.length - 1 for seg in segments]
    keep = last + [last[-1]] * max(0, min_rows - len(last))
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        attention_mask=_no_mask(device),
        logits_to_keep=torch.tensor(keep, device=device),
        use_cache=False,
        ragged=RaggedBatch(tuple(segments)),
    )
    for seg in segments:
        seg.kv.commit(seg.length)
    return out.logits[0, : len(segments)].float()  # [n_sequences, vocab]
