"""One generation path (issue 13): `quantpress.generate`, the terminal chat and the server (TGI and
OpenAI routes) all run on the engine, with one parameter type, sampler, stop-string filter and
detokenizer. So for one prompt they give the same tokens: greedy ones equal the plain reference
loop's (tests/reference/generate_loop.py), and seeded sampled ones equal each other's.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import pytest
from reference.generate_loop import reference_generate
from server_harness import running

import quantpress
from quantpress.prompts import chat_formatter
from quantpress.runtime.chat import chat_loop, stream_reply
from quantpress.runtime.detokenize import StopFilter
from quantpress.runtime.engine import Engine, eos_ids
from quantpress.runtime.sampling import SamplingParams, with_stops
from quantpress.server import ServerSettings, create_app

PROMPT = "ROMEO:"
CHAT = [{"role": "user", "content": "The king said"}]
TEMPLATE = "vicuna"  # a format with a stop string ("USER:"), so the chat paths cut replies too
N = 12
GREEDY = SamplingParams(max_new_tokens=N, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=1234)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def http(loaded) -> Iterator[httpx.Client]:
    app = create_app(loaded, ServerSettings(model_id="m", template=TEMPLATE))
    with running(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        yield client


def tgi_fields(params: SamplingParams) -> dict:
    """`params` as TGI parameters: greedy is do_sample false (TGI refuses temperature 0)."""
    knobs = {"max_new_tokens": params.max_new_tokens, "repetition_penalty": params.repetition_penalty}
    if params.greedy:
        return {**knobs, "do_sample": False}
    return {**knobs, "do_sample": True, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": params.seed}


def openai_fields(params: SamplingParams) -> dict:
    """`params` as OpenAI fields (vLLM's top_k and repetition_penalty included): greedy is temperature 0."""
    return {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "repetition_penalty": params.repetition_penalty, "seed": params.seed}


def text_of(loaded, ids: list[int]) -> str:
    eos = eos_ids(loaded)
    return loaded.tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=True)


def tgi_ids(http: httpx.Client, params: SamplingParams) -> list[int]:
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {**tgi_fields(params), "details": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def openai_completion(http: httpx.Client, prompt_ids: list[int], params: SamplingParams) -> dict:
    r = http.post("/v1/completions", json={"prompt": prompt_ids, "logprobs": 0, **openai_fields(params)})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def chat_reply_ids(loaded, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    """The terminal chat's reply function on `prompt_ids`, on an engine as chat_loop makes one."""
    with Engine(loaded, max_batch_size=1, max_concurrent_requests=1) as engine:
        return stream_reply(engine, prompt_ids, params, lambda text: None).token_ids


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_generate_chat_and_server_give_the_same_tokens(loaded, http, params):
    prompt_ids = loaded.tokenizer(PROMPT).input_ids
    generated = quantpress.generate(loaded, PROMPT, params)
    assert len(generated.token_ids) == N and generated.finish_reason == "length"
    assert chat_reply_ids(loaded, prompt_ids, params) == generated.token_ids
    assert tgi_ids(http, params) == generated.token_ids
    completion = openai_completion(http, prompt_ids, params)
    assert completion["text"] == generated.text == text_of(loaded, generated.token_ids)
    assert len(completion["logprobs"]["tokens"]) == N
    if params.greedy:
        assert generated.token_ids == reference_generate(loaded, prompt_ids, params)
    else:  # the seed matters: this run really sampled
        assert generated.token_ids != quantpress.generate(loaded, PROMPT, GREEDY).token_ids
        assert generated.token_ids != quantpress.generate(loaded, PROMPT, SamplingParams(
            **{**params.__dict__, "seed": params.seed + 1})).token_ids


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_chat_loop_and_the_chat_route_give_the_same_reply(loaded, http, params):
    formatter = chat_formatter(loaded, TEMPLATE)
    lines = iter([CHAT[0]["content"]])
    conversation = chat_loop(loaded, formatter, params, system=None, read=lambda: next(lines, None),
                             write=lambda text: None)
    reply = conversation[-1]["content"]
    r = http.post("/v1/chat/completions", json={"messages": CHAT, **openai_fields(params)})
    assert r.status_code == 200, r.text
    # the terminal chat also strips surrounding whitespace (the reply goes back into the conversation)
    assert r.json()["choices"][0]["message"]["content"].strip() == reply
    if params.greedy:
        stopping = with_stops(params, formatter.stop)
        oracle = reference_generate(loaded, formatter.encode(CHAT), stopping)
        expected = StopFilter(stopping.stop, strip=True)
        expected.feed(text_of(loaded, oracle))
        expected.finish()
        assert reply == expected.text and reply
