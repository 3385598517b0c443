"""`quantpress serve`, TGI routes: a real server on loopback, driven by the real clients.

huggingface_hub.InferenceClient and the legacy text-generation client parse what they get with
their own models, so a field or framing mistake fails here as it would for a user; raw httpx
checks the bytes on the wire.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError
from reference.generate_loop import reference_generate
from server_harness import running, tgi_events

from quantpress.runtime.engine import eos_ids
from quantpress.runtime.sampling import SamplingParams
from quantpress.server import ServerSettings, create_app, openai_api, tgi

# the legacy client calls pydantic's deprecated .dict(); its warnings are not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation")

PROMPT = "ROMEO:"
TIMEOUT = 60.0



@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, ServerSettings(model_id="tiny-llama", max_input_tokens=256))


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client


def generate(http, inputs: str = PROMPT, path: str = "/generate", **parameters) -> httpx.Response:
    return http.post(path, json={"inputs": inputs, "parameters": parameters})


def greedy_reference(loaded, prompt: str, n: int) -> str:
    """The reference loop's greedy text (EOS left out, as generated_text leaves it out)."""
    ids = reference_generate(loaded, loaded.tokenizer(prompt).input_ids, SamplingParams(max_new_tokens=n, temperature=0))
    return loaded.tokenizer.decode([i for i in ids if i not in eos_ids(loaded)], skip_special_tokens=True)


# -- clients -----------------------------------------------------------------------------------


def test_greedy_generation_matches_the_reference_loop(http, loaded):
    r = generate(http, max_new_tokens=12)
    assert r.status_code == 200, r.text
    assert r.json() == {"generated_text": greedy_reference(loaded, PROMPT, 12)}
    assert r.headers["x-generated-tokens"] == "12"
    assert r.headers["x-prompt-tokens"] == str(len(loaded.tokenizer(PROMPT).input_ids))
    assert float(r.headers["x-compute-time"]) > 0


def test_inference_client_text_generation(url, loaded):
    client = InferenceClient(base_url=url, timeout=TIMEOUT)
    expected = greedy_reference(loaded, PROMPT, 10)
    assert client.text_generation(PROMPT, max_new_tokens=10) == expected

    out = client.text_generation(PROMPT, max_new_tokens=10, details=True, decoder_input_details=True)
    assert out.generated_text == expected
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 10
    assert len(out.details.tokens) == 10 and out.details.seed is None  # greedy: no seed, as TGI
    assert "".join(t.text for t in out.details.tokens if not t.special) == expected
    prompt_ids = loaded.tokenizer(PROMPT).input_ids
    assert [t.id for t in out.details.prefill] == prompt_ids and out.details.prefill[0].logprob is None

    assert "".join(client.text_generation(PROMPT, max_new_tokens=10, stream=True)) == expected
    events = list(client.text_generation(PROMPT, max_new_tokens=10, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, 11))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == expected
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 10
    assert events[-1].details.input_length == len(prompt_ids)


def test_inference_client_raises_typed_errors(url):
    client = InferenceClient(base_url=url, timeout=TIMEOUT)
    with pytest.raises(HubValidationError, match="`top_k` must be strictly positive"):
        client.text_generation(PROMPT, max_new_tokens=4, top_k=0)
    with pytest.raises(HubValidationError, match="`top_k` must be strictly positive"):
        list(client.text_generation(PROMPT, max_new_tokens=4, top_k=0, stream=True))


def test_legacy_text_generation_client(url, loaded):
    # Its metadata pins huggingface-hub<1, so it is installed apart (--no-deps, see .ci/run).
    text_generation = pytest.importorskip("text_generation")
    client = text_generation.Client(url, timeout=int(TIMEOUT))
    expected = greedy_reference(loaded, PROMPT, 8)
    response = client.generate(PROMPT, max_new_tokens=8)  # sends every key, nulls included
    assert response.generated_text == expected
    assert response.details.finish_reason.value == "length" and response.details.generated_tokens == 8
    assert response.details.prefill == []

    events = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == 8

    sampled = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, top_k=20)
    assert sampled.details.seed == 7
    assert client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=7, top_k=20) == sampled
    with pytest.raises(text_generation.errors.ValidationError, match="`stop` supports up to 4 stop sequences"):
        client.generate(PROMPT, max_new_tokens=4, stop_sequences=list("abcde"))


# -- wire format -------------------------------------------------------------------------------


def test_generate_stream_wire_format(http, loaded):
    r = generate(http, path="/generate_stream", max_new_tokens=5, details=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert b"[DONE]" not in r.content
    events = tgi_events(r.content)
    assert len(events) == 5
    for i, event in enumerate(events, start=1):
        assert set(event) == {"index", "token", "generated_text", "details"} and event["index"] == i
        assert set(event["token"]) == {"id", "text", "logprob", "special"}
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    expected = greedy_reference(loaded, PROMPT, 5)
    assert events[-1]["generated_text"] == expected == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None,
                                     "input_length": len(loaded.tokenizer(PROMPT).input_ids)}


def test_root_route_is_a_list_or_a_stream(http, loaded):
    expected = greedy_reference(loaded, PROMPT, 4)
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": False})
    assert r.status_code == 200 and r.json() == [{"generated_text": expected}]
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True})
    events = tgi_events(r.content)
    assert events[-1]["generated_text"] == expected and events[-1]["details"] is None


def test_nulls_and_unknown_keys_are_accepted(http, loaded):
    nulls = {key: None for key in ("best_of", "temperature", "repetition_penalty", "frequency_penalty", "top_k",
                                   "top_p", "typical_p", "do_sample", "return_full_text", "stop", "truncate",
                                   "watermark", "details", "decoder_input_details", "seed", "top_n_tokens",
                                   "grammar", "adapter_id")}
    body = {"inputs": PROMPT, "parameters": {**nulls, "max_new_tokens": 3, "no_such_key": 1}, "extra": True}
    r = http.post("/generate", json=body)
    assert r.status_code == 200 and r.json() == {"generated_text": greedy_reference(loaded, PROMPT, 3)}


def test_details_with_prefill_logprobs(http, loaded):
    r = generate(http, "The king said", max_new_tokens=3, details=True, decoder_input_details=True)
    details = r.json()["details"]
    ids = loaded.tokenizer("The king said").input_ids
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert [p["id"] for p in details["prefill"]] == ids
    assert "".join(p["text"] for p in details["prefill"]) == "The king said"
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert details["prefill"][0]["logprob"] is None
    assert [p["logprob"] for p in details["prefill"][1:]] == pytest.approx(expected, abs=1e-3)


def test_stop_sequence_is_kept_in_the_text(http, loaded):
    full = greedy_reference(loaded, PROMPT, 16)
    stop = full[5:9]
    out = generate(http, max_new_tokens=16, stop=[stop], details=True).json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["generated_text"].startswith(full[: full.index(stop) + len(stop)])
    assert len(out["generated_text"]) < len(full)


def test_return_full_text_and_truncate(http, loaded):
    r = generate(http, max_new_tokens=3, return_full_text=True)
    assert r.json()["generated_text"] == PROMPT + greedy_reference(loaded, PROMPT, 3)
    long_prompt = "The king said to the queen"
    ids = loaded.tokenizer(long_prompt).input_ids
    r = generate(http, long_prompt, max_new_tokens=2, truncate=3, details=True, decoder_input_details=True)
    assert [p["id"] for p in r.json()["details"]["prefill"]] == ids[-3:]


def test_sampling_is_seeded_and_reported(http):
    first = generate(http, max_new_tokens=10, do_sample=True, seed=1234, details=True).json()
    again = generate(http, max_new_tokens=10, do_sample=True, seed=1234, details=True).json()
    assert first["details"]["seed"] == 1234 and first["generated_text"] == again["generated_text"]
    warped = generate(http, max_new_tokens=4, temperature=0.7, details=True).json()  # a warper alone samples
    assert isinstance(warped["details"]["seed"], int)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parameters", "message"), [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": -5}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not allowed for this endpoint"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 256. Given: 0"),
    ({"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    ({"grammar": {"type": "json", "value": {"properties": {}}}}, "grammar is not supported"),
    ({"watermark": True}, "`watermark` is not supported"),
    ({"max_new_tokens": 600}, ("`inputs` tokens + `max_new_tokens` must be <= 512. Given: 2 `inputs` tokens and "
                               "600 `max_new_tokens`")),
])
def test_validation_errors_have_tgi_bodies(http, parameters, message):
    r = generate(http, **parameters)
    assert r.status_code == 422
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_prompt_limits(http):
    r = generate(http, "", max_new_tokens=2)
    assert r.json() == {"error": "Input validation error: `inputs` cannot be empty", "error_type": "validation"}
    long_prompt = " the" * 300
    r = generate(http, long_prompt, max_new_tokens=2)
    assert r.status_code == 422
    assert r.json()["error"] == "Input validation error: `inputs` must have less than 256 tokens. Given: 300"


def test_stream_only_errors_are_http_errors_before_the_stream(http):
    r = generate(http, path="/generate_stream", max_new_tokens=2, decoder_input_details=True)
    assert r.status_code == 422
    assert r.json()["error"] == ("Input validation error: `decoder_input_details` == true is not supported "
                                 "when streaming tokens")
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"best_of": 2}, "stream": True})
    assert r.json()["error"] == "Input validation error: `best_of` != 1 is not supported when streaming tokens"


def test_malformed_bodies_are_422(http):
    r = http.post("/generate", content=b'{"inputs": "x", "parameters": {', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Failed to parse the request body as JSON")
    r = http.post("/generate", json={"inputs": "x", "parameters": {"temperature": "hot"}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "parameters.temperature" in r.json()["error"]
    r = http.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = http.post("/generate", content=b'{"inputs": "x", "parameters": {"temperature": NaN}}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 422 and "parameters.temperature" in r.json()["error"]
    r = generate(http, max_new_tokens=2, stop=[""])  # an empty stop string would stop at once: dropped
    assert r.status_code == 200 and r.json()["generated_text"]


def test_an_unexpected_error_is_a_json_500_in_the_route_family_shape(http, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tgi, "validate_generate", broken)
    monkeypatch.setattr(openai_api, "completion_prompts", broken)
    r = generate(http, max_new_tokens=2)
    assert r.status_code == 500 and r.json() == {"error": "Internal server error: RuntimeError", "error_type": "internal"}
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    assert "connection" not in r.headers  # the keep-alive connection stays open


def test_unknown_routes_answer_in_the_route_family_shape(http):
    assert http.get("/nowhere").json() == {"error": "Not Found", "error_type": "not_found"}
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# -- info, health, metrics, tokenize -----------------------------------------------------------


def test_info_health_and_tokenize(http, loaded):
    info = http.get("/info").json()
    assert info["model_id"] == "tiny-llama" and info["max_input_tokens"] == 256 and info["max_total_tokens"] == 512
    assert info["max_concurrent_requests"] == 128 and info["max_stop_sequences"] == 4 and info["max_best_of"] == 1
    assert {"model_sha", "model_dtype", "model_device_type", "model_pipeline_tag", "validation_workers",
            "max_client_batch_size", "router", "version", "sha", "docker_label"} <= set(info)
    for path in ("/health", "/ping", "/"):
        r = http.get(path)
        assert r.status_code == 200 and r.content == b""

    text = "Hello world, the king"
    tokens = http.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == loaded.tokenizer(text).input_ids
    assert all(t["text"] == text[t["start"]:t["stop"]] for t in tokens)
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(text)


def test_metrics_use_tgi_names(http):
    generate(http, max_new_tokens=2)
    generate(http, temperature=-1)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.text.splitlines()
               if line and not line.startswith("#")}
    assert samples["tgi_request_count"] >= 2 and samples["tgi_request_success"] >= 1
    assert samples['tgi_request_failure{err="validation"}'] >= 1
    assert samples["tgi_request_duration_count"] == samples["tgi_request_success"]
    for name in ("tgi_request_generated_tokens_sum", "tgi_request_input_length_count", "tgi_request_queue_duration_sum",
                 "tgi_request_inference_duration_sum", "tgi_request_mean_time_per_token_duration_count",
                 'tgi_request_duration_bucket{le="+Inf"}', "tgi_queue_size", "tgi_batch_current_size"):
        assert name in samples, name


def test_two_apps_keep_separate_metrics(loaded):
    first = create_app(loaded, ServerSettings(model_id="a"))
    second = create_app(loaded, ServerSettings(model_id="b"))
    assert first.state.quantpress.metrics.registry is not second.state.quantpress.metrics.registry


def test_json_has_no_spaces_and_keeps_unicode(http):
    r = generate(http, "Ça va", path="/generate_stream", max_new_tokens=2, return_full_text=True)
    last = r.content.strip().split(b"\n\n")[-1]
    assert last.startswith(b'data:{"index":2,"token":{"id":')  # serde_json's compact form
    assert '"generated_text":"Ça va'.encode() in last
    assert json.loads(last[len(b"data:"):])["generated_text"].startswith("Ça va")
