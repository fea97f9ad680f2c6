"""AsyncEngine: concurrent streams give each request's generate tokens; a cancelled stream aborts its request."""

from __future__ import annotations

import asyncio
import contextlib

import jax
import pytest
from conftest import check_logprobs_match_score, random_prompts

import jaxinfer
from jaxinfer import model as model_lib
from jaxinfer.errors import ParameterError

GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    return jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))


@pytest.fixture(scope="module")
def engine(tiny):
    engine = jaxinfer.AsyncEngine(tiny, max_slots=4, max_tokens_per_step=64, page_size=8, prefill_chunk=32)
    yield engine
    engine.close()


def test_concurrent_streams_equal_generate_alone(tiny, engine):
    prompts = random_prompts(tiny.cfg.vocab_size, [5, 40, 1, 17, 9, 60], seed=2)
    sampling = [GREEDY, jaxinfer.SamplingParams(temperature=0.8, top_k=30)] * 3

    async def one(i):
        await asyncio.sleep(0.01 * i)  # staggered arrivals
        tokens = []
        async for out in engine.stream(prompts[i], sampling=sampling[i], max_new_tokens=10, seed=i):
            assert len(out.new_token_ids) == 1
            tokens += out.new_token_ids
        return tokens, out.finish_reason

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    results = asyncio.run(main())
    for i, (tokens, reason) in enumerate(results):
        (want,) = jaxinfer.generate(tiny, [prompts[i]], max_new_tokens=10, sampling=sampling[i], seed=i)
        assert (tokens, reason) == (want.tokens, want.finish_reason)
    assert engine.metrics()["compilations_after_warm_up"] == 0


def test_streams_deliver_each_tokens_logprobs(tiny, engine):
    prompts = random_prompts(tiny.cfg.vocab_size, [7, 21], seed=5)
    sampled = jaxinfer.SamplingParams(temperature=0.8)

    async def one(prompt, logprobs):
        outs = [out async for out in engine.stream(prompt, sampling=sampled, max_new_tokens=8, seed=1,
                                                   logprobs=logprobs)]
        return [t for o in outs for t in o.new_token_ids], [o.logprobs for o in outs]

    async def main():
        return await asyncio.gather(one(prompts[0], 3), one(prompts[1], None))

    (tokens, logprobs), (_, none) = asyncio.run(main())
    assert all(len(lp) == 1 and len(lp[0].top) == 3 for lp in logprobs) and all(lp is None for lp in none)
    check_logprobs_match_score(tiny, prompts[0], tokens, [lp for (lp,) in logprobs])
    with pytest.raises(ParameterError, match="logprobs"):
        asyncio.run(one(prompts[0], -1))


def test_cancelling_a_stream_aborts_its_request(tiny, engine):
    async def main():
        started = asyncio.Event()

        async def long():
            async for out in engine.stream([1, 2, 3], sampling=GREEDY, max_new_tokens=400):
                started.set()

        task = asyncio.create_task(long())
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The others still run to the end.
        tokens = [t async for out in engine.stream([4, 5], sampling=GREEDY, max_new_tokens=6) for t in out.new_token_ids]
        return tokens

    tokens = asyncio.run(main())
    assert tokens == jaxinfer.generate(tiny, [[4, 5]], max_new_tokens=6, sampling=GREEDY)[0].tokens
    m = engine.metrics()
    assert m["running"] == m["waiting"] == m["kv_pages_running"] == 0


def test_a_bad_request_raises_at_the_call_and_queues_nothing(engine):
    async def main():
        with pytest.raises(ParameterError, match="max_new_tokens"):
            engine.stream([1], max_new_tokens=0)
        with pytest.raises(ParameterError, match="outside the vocabulary"):
            engine.stream([10**6])
        return engine.metrics()

    m = asyncio.run(main())
    assert m["waiting"] == m["running"] == 0
