"""`quantpress serve`, OpenAI routes: openai-python, huggingface_hub's chat_completion, lm-eval's
loglikelihood request, and the stream framing byte for byte."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest
import torch
from huggingface_hub import InferenceClient
from server_harness import openai_events, running

from quantpress.server import ServerSettings, create_app

TIMEOUT = 60.0
MESSAGES = [{"role": "user", "content": "ROMEO:"}]



@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, ServerSettings(model_id="tiny-llama"))


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def prompt_logprobs(loaded, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]


# -- chat --------------------------------------------------------------------------------------


def test_chat_completion_with_openai_client(client, app):
    reply = client.chat.completions.create(model="anything", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny-llama" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    prompt_tokens = len(app.state.quantpress.formatter.encode(MESSAGES))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 8)
    assert reply.usage.total_tokens == prompt_tokens + 8

    chunks = list(client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == choice.message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_wire_format(http):
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content.endswith(b"data: [DONE]\n\n")
    events = openai_events(r.content)
    first, *content, finish, usage = events
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in content)
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in events[:-1])


def test_chat_sampling_is_seeded(client):
    def ask() -> str:
        reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10, temperature=0.9,
                                               top_p=0.95, seed=11)
        return reply.choices[0].message.content

    assert ask() == ask()


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=1)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert all(e.logprob <= 0 and e.top_logprobs[0].token == e.token for e in entries)


def test_inference_client_chat_completion(url, client):
    expected = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6,
                                              temperature=0).choices[0].message.content
    hub = InferenceClient(base_url=url, timeout=TIMEOUT)
    out = hub.chat_completion(MESSAGES, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "length"
    chunks = list(hub.chat_completion(MESSAGES, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_chat_errors_have_openai_bodies(http, client):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 2})
    assert r.status_code == 422
    assert r.json() == {"error": {"message": "Input validation error: `n` must be 1: one choice is generated per "
                                             "request. Given: 2", "type": "invalid_request_error", "param": None,
                                  "code": "validation"}}
    with pytest.raises(openai.UnprocessableEntityError, match="`messages` cannot be empty"):
        client.chat.completions.create(model="m", messages=[])
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}] * 2, "max_tokens": 2})
    assert r.status_code == 422 and r.json()["error"]["code"] == "template_error"
    r = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": " the" * 600}]})
    assert r.status_code == 422 and "must have less than 511 tokens" in r.json()["error"]["message"]


# -- completions -------------------------------------------------------------------------------


def test_completion_echo_logprobs_for_lm_eval(client, loaded):
    prompt = "The king said to the queen"
    ids = loaded.tokenizer(prompt).input_ids
    reply = client.completions.create(model="m", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert "".join(lp.tokens[: len(ids)]) == prompt and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(prompt_logprobs(loaded, ids), abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(top == {tok: value} for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:],
                                                               lp.top_logprobs[1:]))
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 1


def test_completion_token_batches_and_max_tokens_zero(http, loaded):
    """lm-eval sends token ids, several prompts a request, and may ask for no new token."""
    a, b = loaded.tokenizer("ROMEO: I").input_ids, loaded.tokenizer("The king").input_ids
    body = {"model": "m", "prompt": [a, b], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0,
            "seed": 1234}
    out = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for ids, choice in zip((a, b), out["choices"]):
        assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(prompt_logprobs(loaded, ids), abs=1e-3)
    assert out["usage"] == {"prompt_tokens": len(a) + len(b), "completion_tokens": 0,
                            "total_tokens": len(a) + len(b)}


def test_completion_strips_stop_strings_streamed_or_not(client):
    full = client.completions.create(model="m", prompt="ROMEO:", max_tokens=16, temperature=0).choices[0].text
    stop = full[6:10]
    cut = full[: full.index(stop)]
    reply = client.completions.create(model="m", prompt="ROMEO:", max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="m", prompt="ROMEO:", max_tokens=16, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"


def test_completion_stream_wire_format(http):
    r = http.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "stream": True,
                                           "echo": True})
    events = openai_events(r.content)
    assert events[0]["choices"][0]["text"] == "ROMEO:"
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"][0]["text"] == ""


def test_completion_errors(http, client):
    with pytest.raises(openai.UnprocessableEntityError, match="`logprobs` must be >= 0 and <= 5"):
        client.completions.create(model="m", prompt="a", logprobs=6)
    r = http.post("/v1/completions", json={"prompt": [[1, 999999]]})
    assert r.status_code == 422 and "token ids must be in" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True})
    assert r.status_code == 422


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"] and models.data[0].owned_by == "quantpress"
