"""TGI request bodies and TGI's validation rules (router/src/validation.rs), with its messages.

Every field is optional and nullable, and unknown keys are ignored: huggingface_hub sends only the
keys it was given, the text-generation client sends every key with explicit nulls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, FiniteFloat

from quantpress.errors import ConfigError
from quantpress.runtime.sampling import MAX_SEED, SamplingParams
from quantpress.server.errors import invalid
from quantpress.server.settings import Limits


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    temperature: FiniteFloat | None = None
    repetition_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None  # validated like TGI; the engine has no frequency penalty
    top_k: int | None = None
    top_p: FiniteFloat | None = None
    typical_p: FiniteFloat | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: list[str] | None = None
    truncate: int | None = None
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    seed: int | None = None
    top_n_tokens: int | None = None  # validated; top alternatives are not reported
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    # Absent parameters mean TGI's `default_parameters()`, which samples; `{}` means greedy.
    parameters: GenerateParameters | None = None
    add_special_tokens: bool | None = None


class CompatGenerateRequest(GenerateRequest):
    stream: bool | None = None


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams
    details: bool
    decoder_input_details: bool
    return_full_text: bool

    @property
    def input_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def sampling(self) -> bool:
        """TGI reports the seed only when sampling."""
        return not self.params.greedy


def sampling_parameters(p: GenerateParameters, *, defaulted: bool) -> dict:
    """TGI's checks on the sampling knobs, and the SamplingParams fields they amount to.

    Sampling is on when asked for or when any warper is active (TGI `has_warpers`): a temperature,
    top_k, top_p or typical_p sent without `do_sample` still samples. TGI's greedy (`do_sample`
    false, no warper) is temperature 0, the one greedy convention of SamplingParams; TGI itself
    refuses a temperature of 0, so no request can mean anything else by it.
    """
    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0:
        raise invalid("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0:
        raise invalid("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise invalid("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise invalid("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise invalid("`top_k` must be strictly positive")
    top_p = 1.0 if p.top_p is None else p.top_p
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    top_k = p.top_k or 0
    do_sample = defaulted if p.do_sample is None else p.do_sample
    warpers = temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
    return {"temperature": temperature if do_sample or warpers else 0.0, "top_k": top_k, "top_p": top_p,
            "typical_p": typical_p, "repetition_penalty": repetition_penalty}


def check_unsupported(p: GenerateParameters, *, stream: bool, limits: Limits) -> None:
    best_of = 1 if p.best_of is None else p.best_of
    if best_of < 1:
        raise invalid(f"`best_of` must be > 0 and <= 1. Given: {best_of}")
    if best_of > 1:
        # quantpress has max_best_of 1: TGI's answers for that setting
        raise invalid("`best_of` != 1 is not supported when streaming tokens" if stream
                      else "`best_of` != 1 is not allowed for this endpoint")
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
    if p.grammar is not None:
        raise invalid("grammar is not supported")
    if p.watermark:
        raise invalid("`watermark` is not supported")
    if p.adapter_id:
        raise invalid("`adapter_id` is not supported: quantpress serves one model without adapters")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= limits.max_top_n_tokens:
        raise invalid(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}")


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise invalid(f"`seed` must be an integer between 0 and {MAX_SEED}. Given: {seed}")


def stop_sequences(stop: list[str] | None, limits: Limits) -> list[str]:
    """The request's stop strings, at most max_stop_sequences; "" (which would stop at once) is dropped."""
    stop = stop or []
    if len(stop) > limits.max_stop_sequences:
        raise invalid(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}")
    return [s for s in stop if s]


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from validated fields (TGI's or OpenAI's); its own guard speaks only if a check
    above missed."""
    try:
        return SamplingParams(**fields)
    except ConfigError as e:
        raise invalid(str(e)) from e


def resolve_max_new_tokens(requested: int | None, input_length: int, limits: Limits) -> int:
    """TGI's length rules: null fills the context; the sum must fit max_total_tokens; the input max_input_tokens."""
    if requested is not None and requested <= 0:
        raise invalid("`max_new_tokens` must be strictly positive")
    max_new_tokens = limits.max_total_tokens - input_length if requested is None else requested
    if input_length + max_new_tokens > limits.max_total_tokens:
        raise invalid(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                      f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
    check_input_length(input_length, limits)
    return max_new_tokens


def check_input_length(input_length: int, limits: Limits) -> None:
    if input_length > limits.max_input_tokens:
        raise invalid(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}")


def truncate_ids(ids: list[int], truncate: int | None, limits: Limits) -> list[int]:
    """`truncate` keeps the last N prompt tokens (TGI: `ids[len - N..]`)."""
    if truncate is None:
        return ids
    if not 0 < truncate <= limits.max_input_tokens:
        raise invalid(f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                      f"Given: {truncate}")
    return ids[-truncate:]


def validate_generate(request: GenerateRequest, tokenizer, limits: Limits, *, stream: bool,
                      default_full_text: bool = False) -> ValidRequest:
    """A TGI body -> prompt ids and engine parameters, or the ApiError TGI would answer."""
    defaulted = request.parameters is None
    p = request.parameters or GenerateParameters()
    check_unsupported(p, stream=stream, limits=limits)
    sampling = sampling_parameters(p, defaulted=defaulted)
    stop = stop_sequences(p.stop, limits)
    check_seed(p.seed)
    if not request.inputs:
        raise invalid("`inputs` cannot be empty")
    add_special = True if request.add_special_tokens is None else request.add_special_tokens
    ids = truncate_ids(encode(tokenizer, request.inputs, add_special), p.truncate, limits)
    max_new_tokens = resolve_max_new_tokens(p.max_new_tokens, len(ids), limits)
    params = sampling_params(max_new_tokens=max_new_tokens, seed=p.seed, stop=tuple(stop), **sampling)
    return ValidRequest(
        prompt_ids=ids,
        params=params,
        details=bool(p.details),
        decoder_input_details=bool(p.decoder_input_details),
        return_full_text=default_full_text if p.return_full_text is None else p.return_full_text,
    )


def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """The text as-is, with the tokenizer's own special tokens unless told otherwise (as TGI encodes)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
