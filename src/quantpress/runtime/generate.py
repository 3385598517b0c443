"""Text generation with a KV cache: prefill the prompt once, then decode one token at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from quantpress.errors import CheckpointError, PromptTooLong
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams, sample_next


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos_token" or "length"


def eos_ids(loaded: LoadedModel) -> set[int]:
    ids = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
    ids = list(ids) if isinstance(ids, list) else [ids]
    if loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is not None:
        ids.append(loaded.tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def check_length(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = loaded.max_length
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise PromptTooLong(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"limit of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )


@torch.inference_mode()
def generate_ids(loaded: LoadedModel, prompt_ids: Tensor, params: SamplingParams) -> Iterator[int]:
    """Yield new token ids for a 1-D prompt, stopping at EOS (which is yielded) or the length."""
    check_length(loaded, prompt_ids.numel(), params.max_new_tokens)
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    stop = eos_ids(loaded)
    seen = prompt_ids.clone()
    out = loaded.model(input_ids=prompt_ids[None], use_cache=True)  # prefill
    for _ in range(params.max_new_tokens):
        token = sample_next(out.logits[0, -1], seen, params, generator)
        yield token
        if token in stop:
            return
        seen = torch.cat([seen, torch.tensor([token])])
        out = loaded.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)


def complete(loaded: LoadedModel, prompt: str, params: SamplingParams) -> Completion:
    """Generate a completion of `prompt` (tokenized as-is; chat templates come later)."""
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path} has no tokenizer files; cannot encode a text prompt")
    prompt_ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids[0]
    tokens = list(generate_ids(loaded, prompt_ids, params))
    finish = "eos_token" if tokens and tokens[-1] in eos_ids(loaded) else "length"
    text_ids = tokens[:-1] if finish == "eos_token" else tokens
    return Completion(loaded.tokenizer.decode(text_ids, skip_special_tokens=True), tokens, prompt_ids.numel(), finish)
