"""The plain generation loop: the test oracle for the engine, the one decode loop of quantpress.

Prefill the whole prompt in one ordinary forward, then decode one token at a time with
transformers' own KV cache: no packing, no chunking, no scheduler. Greedy tokens of every
generation path (quantpress.generate, the terminal chat, the server) must equal this loop's.
Do not optimise it: its value is that it is obviously right.
"""

from __future__ import annotations

import torch

from quantpress.runtime.engine import eos_ids
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams, sample_next


@torch.inference_mode()
def reference_generate(loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """New token ids for `prompt_ids`, up to and including the first EOS id, at most max_new_tokens.

    Sampled runs draw from a generator seeded with params.seed (0 when None); they match the
    engine only as far as the logits are bitwise the same, so tests compare greedy runs to it.
    """
    generator = torch.Generator().manual_seed(params.seed or 0)
    eos = eos_ids(loaded)
    seen = torch.tensor(prompt_ids)
    out = loaded.model(input_ids=seen[None], use_cache=True)  # prefill
    tokens: list[int] = []
    for _ in range(params.max_new_tokens):
        token = sample_next(out.logits[0, -1], seen, params, generator)
        tokens.append(token)
        if token in eos:
            break
        seen = torch.cat([seen, torch.tensor([token])])
        out = loaded.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
