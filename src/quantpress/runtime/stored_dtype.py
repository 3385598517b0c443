"""Embedding and lm_head kept in the checkpoint's dtype while the model computes in another.

A GPTQ checkpoint stores `embed_tokens` and `lm_head` in fp16 (or bf16); in a 4-bit model of
SmolLM2's size they are half the file. Converting them to an fp32 compute dtype at load would
double that, so they stay as stored and only their outputs take the compute dtype:
- the embedding looks rows up in the stored dtype and casts them (exact: fp16 -> fp32 is exact);
- the head multiplies in the stored dtype (fp16/bf16 GEMMs are as fast as fp32 ones here, see
  bench/kernels.py). With `exact`, it upcasts bounded tiles of its weight instead, so logits
  equal an fp32 head bit for bit (evaluation, tests).
Tied weights stay tied: both modules hold the same Parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE_ELEMENTS = 1 << 22  # head weights upcast at once in exact mode (16 MiB of fp32)


class StoredDtypeEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, *,
                 stored: torch.dtype, compute: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype=stored, device=device)
        self.compute_dtype = compute

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids).to(self.compute_dtype)


class StoredDtypeLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, *, stored: torch.dtype,
                 exact: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype=stored, device=device)
        self.exact = exact

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) in the compute dtype
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        if not self.exact:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        tile = max(1, TILE_ELEMENTS // self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for n0 in range(0, self.out_features, tile):
            n1 = min(self.out_features, n0 + tile)
            y[..., n0:n1] = F.linear(x, self.weight[n0:n1].to(x.dtype), None if bias is None else bias[n0:n1])
        return y


def keep_stored_dtype(model: nn.Module, stored: dict[str, torch.dtype], compute: torch.dtype, exact: bool) -> None:
    """Swap a meta model's input embedding and output head for stored-dtype versions, where the
    checkpoint's dtype (`stored`, by module name) differs from `compute`."""
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, nn.Embedding) and stored.get(names[embedding], compute) != compute:
        model.set_submodule(names[embedding], StoredDtypeEmbedding(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            stored=stored[names[embedding]], compute=compute, device=embedding.weight.device))
    if isinstance(head, nn.Linear) and head is not None:
        dtype = stored.get(names[head], stored.get(names[embedding], compute))  # tied: the embedding's
        if dtype != compute:
            model.set_submodule(names[head], StoredDtypeLinear(
                head.in_features, head.out_features, head.bias is not None, stored=dtype, exact=exact,
                device=head.weight.device))
