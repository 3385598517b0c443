"""The server's pure pieces: stop-string hold-back, token texts, TGI's sampling and length rules."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import quantpress
from quantpress.errors import ConfigError
from quantpress.runtime.detokenize import StopFilter, stop_prefix_length
from quantpress.runtime.engine import TokenEvent
from quantpress.runtime.sampling import SamplingParams
from quantpress.server.errors import ApiError
from quantpress.server.settings import Limits, ServerSettings, resolve_limits
from quantpress.server.text import StreamedText, token_texts
from quantpress.server.validation import (
    GenerateParameters,
    GenerateRequest,
    resolve_max_new_tokens,
    sampling_parameters,
    validate_generate,
)

LIMITS = Limits(model_id="m", max_input_tokens=100, max_total_tokens=128, max_concurrent_requests=4,
                max_batch_size=2, max_stop_sequences=4, max_top_n_tokens=5, max_request_bytes=2_000_000,
                validation_workers=2)


def event(index: int, text: str, *, special: bool = False, finish: str | None = None) -> TokenEvent:
    return TokenEvent(index, index, text, -0.5, special, finish, None)


def test_streamed_text_holds_back_what_may_become_a_stop_string():
    text = StreamedText(["USER:"])
    pushes = [text.push(e) for e in (event(1, "Hello"), event(2, " US"), event(3, "ER"),
                                     event(4, ": more", finish="stop_sequence"))]
    assert [delta for delta, _ in pushes] == ["Hello", " ", "", ""]
    assert text.content == "Hello " and text.finish_reason == "stop"
    assert [[e.index for _, e in released] for _, released in pushes] == [[1], [2], [], [3, 4]]


def test_streamed_text_releases_everything_at_the_end():
    text = StreamedText(["###"])
    assert text.push(event(1, "a #")) == ("a ", [(0, event(1, "a #"))])
    delta, released = text.push(event(2, "</s>", special=True, finish="eos_token"))
    assert delta == "#" and text.content == "a #" and text.finish_reason == "stop"
    assert [(start, e.index) for start, e in released] == [(3, 2)]
    plain = StreamedText([])
    plain.push(event(1, "x", finish="length"))
    assert plain.finish_reason == "length" and plain.content == "x"


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("abc USER: x", ["USER:"], ("abc ", True)),
    ("abc", ["USER:"], ("abc", False)),
    ("a ### b USER:", ["USER:", "###"], ("a ", True)),
])
def test_stop_filter_cuts_at_the_earliest_stop(text, stops, expected):
    cut = StopFilter(stops)
    cut.feed(text)
    cut.finish()
    assert (cut.text, cut.stopped) == expected


def test_stop_prefix_length():
    assert stop_prefix_length("Hello US", ["USER:"]) == 2
    assert stop_prefix_length("Hello", ["USER:"]) == 0
    assert stop_prefix_length("x #", ["##", "#!x"]) == 1


def test_token_texts_rebuild_the_decoded_text():
    tokenizer = AutoTokenizer.from_pretrained(quantpress.bundled_model_dir())
    text = "Hello world, the king said: Ça va? </s> ok"
    ids = tokenizer(text).input_ids
    texts = token_texts(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids) == text
    assert "" in texts and "Ç" in texts  # the half character waits for the byte that completes it
    assert "</s>" in texts


def samples(parameters: GenerateParameters, *, defaulted: bool) -> bool:
    """What TGI's sampling rules make of `parameters`, in SamplingParams' terms (greedy: temperature 0)."""
    return not SamplingParams(**sampling_parameters(parameters, defaulted=defaulted)).greedy


def test_tgi_sampling_rules():
    assert samples(GenerateParameters(), defaulted=True)  # no `parameters` at all
    assert not samples(GenerateParameters(), defaulted=False)  # `parameters: {}`
    assert samples(GenerateParameters(top_p=0.9), defaulted=False)
    assert not samples(GenerateParameters(temperature=1.0), defaulted=False)
    assert samples(GenerateParameters(do_sample=True), defaulted=False)
    assert not samples(GenerateParameters(do_sample=False), defaulted=True)


def test_tgi_length_rules():
    assert resolve_max_new_tokens(None, 10, LIMITS) == 118  # null fills the context
    assert resolve_max_new_tokens(5, 10, LIMITS) == 5
    with pytest.raises(ApiError, match="must be <= 128. Given: 10 `inputs` tokens and 119 `max_new_tokens`"):
        resolve_max_new_tokens(119, 10, LIMITS)
    with pytest.raises(ApiError, match="`inputs` must have less than 100 tokens. Given: 101"):
        resolve_max_new_tokens(1, 101, LIMITS)


def test_truncate_keeps_the_last_tokens():
    tokenizer = AutoTokenizer.from_pretrained(quantpress.bundled_model_dir())
    request = GenerateRequest(inputs="The king said to the queen", parameters=GenerateParameters(truncate=2))
    valid = validate_generate(request, tokenizer, LIMITS, stream=False)
    assert valid.prompt_ids == tokenizer("The king said to the queen").input_ids[-2:]
    assert valid.params.max_new_tokens == 126


def test_limits_default_from_the_model_and_must_fit_it():
    loaded = quantpress.load(quantpress.bundled_model_dir(), tokenizer=False)
    limits = resolve_limits(loaded, ServerSettings())
    assert (limits.model_id, limits.max_input_tokens, limits.max_total_tokens) == ("tiny-llama", 511, 512)
    assert resolve_limits(loaded, ServerSettings(model_id="x", max_total_tokens=256)).max_input_tokens == 255
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        resolve_limits(loaded, ServerSettings(max_total_tokens=1024))
    with pytest.raises(ConfigError, match="must be at least 1 and less than max_total_tokens"):
        resolve_limits(loaded, ServerSettings(max_input_tokens=512))


def test_request_size_limit_fits_max_input_tokens_of_text():
    loaded = quantpress.load(quantpress.bundled_model_dir(), tokenizer=False)
    assert resolve_limits(loaded, ServerSettings()).max_request_bytes == 2_000_000  # TGI's default is the floor
    loaded.model.config.max_position_embeddings = 131072  # a long-context model: 64 bytes per prompt token
    assert resolve_limits(loaded, ServerSettings()).max_request_bytes == 131071 * 64
    assert resolve_limits(loaded, ServerSettings(max_request_bytes=1000)).max_request_bytes == 1000
    with pytest.raises(ConfigError, match="max_request_bytes must be at least 1"):
        resolve_limits(loaded, ServerSettings(max_request_bytes=0))
    with pytest.raises(ConfigError, match="validation_workers must be at least 1"):
        resolve_limits(loaded, ServerSettings(validation_workers=0))
