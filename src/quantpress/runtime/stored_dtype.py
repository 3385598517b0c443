"""Embedding and lm_head kept in the checkpoint's dtype while the model computes in another.

A GPTQ checkpoint stores `embed_tokens` and `lm_head` in fp16 (or bf16); in a 4-bit model of
SmolLM2's size they are half the file. Converting them to an fp32 compute dtype at load would
double that, so they stay as stored and only their outputs take the compute dtype:
- the embedding looks rows up in the stored dtype and casts them (exact: fp16 -> fp32 is exact);
- the head multiplies in the stored dtype (SmolLM2's 49152x576 head, 1 thread: fp16 6.1 ms vs
  fp32 7.7 ms for one row, 210 vs 230 ms for 512). With `exact`, it upcasts bounded tiles of its
  weight instead, so logits equal an fp32 head bit for bit (evaluation, tests).
Tied weights stay tied: both modules hold the same Parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantpress.runtime.kernels import tile_rows, tiled_linear


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
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = tiled_linear(x.reshape(-1, self.in_features), self.out_features, tile_rows(self.in_features, 1),
                         lambda n0, n1, dtype: self.weight[n0:n1].to(dtype), bias)
        return y.view(*x.shape[:-1], self.out_features)


def keep_stored_dtype(model: nn.Module, stored_dtype: Callable[[str], torch.dtype | None], compute: torch.dtype,
                      exact: bool) -> None:
    """Swap a meta model's input embedding and output head for stored-dtype versions where the
    checkpoint stores them (`stored_dtype(tensor name)`, None if absent) in another dtype than
    `compute`. A tied head has no tensor of its own and takes the embedding's dtype."""
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embedding_dtype = stored_dtype(f"{names[embedding]}.weight") or compute
    if isinstance(embedding, nn.Embedding) and embedding_dtype != compute:
        model.set_submodule(names[embedding], StoredDtypeEmbedding(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            stored=embedding_dtype, compute=compute, device=embedding.weight.device))
    if isinstance(head, nn.Linear):
        dtype = stored_dtype(f"{names[head]}.weight") or embedding_dtype
        if dtype != compute:
            model.set_submodule(names[head], StoredDtypeLinear(
                head.in_features, head.out_features, head.bias is not None, stored=dtype, exact=exact,
                device=head.weight.device))
