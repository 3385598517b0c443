"""One completion, as `quantpress.generate` returns it: a single request on an engine of its own.

There is no second decode loop here: the request runs on the continuous-batching engine, so it
gets exactly the tokens the server and the terminal chat would give for the same prompt and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantpress.errors import CheckpointError
from quantpress.runtime.detokenize import StopFilter
from quantpress.runtime.engine import Engine
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text, cut before a stop string (as OpenAI's text)
    token_ids: list[int]  # every generated id, an EOS id or the tokens of a stop string included
    prompt_tokens: int
    finish_reason: str  # "eos_token", "stop_sequence" or "length"


def complete(loaded: LoadedModel, prompt: str, params: SamplingParams) -> Completion:
    """Generate a completion of `prompt` (tokenized as-is, with the tokenizer's special tokens)."""
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path} has no tokenizer files; cannot encode a text prompt")
    prompt_ids = list(loaded.tokenizer(prompt).input_ids)
    with Engine(loaded, max_batch_size=1, max_concurrent_requests=1, inline=True) as engine:
        events = list(engine.submit(prompt_ids, params))
    final = events[-1]
    text = StopFilter(params.stop)
    text.feed(final.generated_text or "")
    text.finish()
    return Completion(text.text, [e.id for e in events], len(prompt_ids), final.finish_reason)
