"""The OpenAI-compatible server, live on a loopback port, through the official `openai` client and raw HTTP.

A tiny random model with the default model's tokenizer and chat template (conftest.tiny_chat_model); every answer
is checked against jaxinfer.generate for the same prompt, sampling settings and seed."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import jaxinfer  # noqa: E402
from jaxinfer.server.app import create_app  # noqa: E402

NAME = "tiny-chat"
GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """-> (base url, model, AsyncEngine) of a server running on a thread for this module's tests."""
    model = jaxinfer.load_model(tiny_chat_model)
    engine = jaxinfer.AsyncEngine(model, max_slots=4, max_tokens_per_step=64, page_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, NAME), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, engine
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def generated(model, ids, max_new_tokens, sampling=GREEDY, seed=0):
    return jaxinfer.generate(model, [ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)[0]


def test_completion_equals_generate_and_counts_usage(served, client):
    _, model, _ = served
    prompt = "Once upon a time"
    ids = model.tokenizer.encode(prompt)
    want = generated(model, ids, 8)
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert got.object == "text_completion" and got.model == NAME and len(got.choices) == 1
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.tokens))
    # Token ids and a list of prompts: a choice per prompt, in order.
    two = client.completions.create(model=NAME, prompt=[ids, "The sky"], max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == want.text
    assert two.choices[1].text == generated(model, model.tokenizer.encode("The sky"), 8).text


def test_streamed_completion_adds_up_and_ends_with_usage(served, client):
    _, model, _ = served
    ids = model.tokenizer.encode("Once upon a time")
    want = generated(model, ids, 8)
    chunks = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)


def test_chat_with_n_choices_each_equals_its_seeded_generate(served, client):
    _, model, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True)
    sampled = jaxinfer.SamplingParams(temperature=1.0, top_p=0.9)
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=1.0, top_p=0.9,
                                         n=2, seed=11)
    assert got.object == "chat.completion" and [c.index for c in got.choices] == [0, 1]
    for j, choice in enumerate(got.choices):
        assert choice.message.role == "assistant"
        assert choice.message.content == generated(model, ids, 6, sampled, seed=11 + j).text
    assert got.usage.prompt_tokens == 2 * len(ids)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == generated(model, ids, 6).text


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # beyond the context of 256
        ({"n": 99}, "n"),
        ({"stop": ["a", ""]}, "stop"),
        ({"logprobs": 2}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_values_are_400s_naming_the_field(served, client, kwargs, param):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**body)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_http_errors_have_openai_shape_and_nothing_is_left_running(served):
    url, _, engine = served
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [NAME]
        r = http.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "other", "prompt": "Hi"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
        # A stream left after its first event: the request is aborted, its pages freed.
        with http.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 200, "stream": True}) as r:
            first = next(r.iter_lines())
            assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
    deadline = time.monotonic() + 30
    while engine.metrics()["running"] or engine.metrics()["waiting"]:
        assert time.monotonic() < deadline, engine.metrics()
        time.sleep(0.05)
