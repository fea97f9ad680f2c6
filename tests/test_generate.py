"""generate / score end to end: batch invariance, bucketing, stop reasons, seeds, bf16, bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxinfer
from conftest import random_prompts
from jaxinfer import kv_cache
from jaxinfer import model as model_lib
from jaxinfer import roofline
from jaxinfer.generate import _prefill, generate_loop, prefill

GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    return jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))


def test_each_prompt_alone_equals_inside_a_mixed_batch(tiny):
    prompts = random_prompts(tiny.cfg.vocab_size, [4, 19, 1, 33, 8], seed=3)
    batched = jaxinfer.generate(tiny, prompts, max_new_tokens=20, sampling=GREEDY)
    for prompt, out in zip(prompts, batched):
        (alone,) = jaxinfer.generate(tiny, [prompt], max_new_tokens=20, sampling=GREEDY)
        assert alone.tokens == out.tokens


def test_new_prompt_lengths_in_a_bucket_do_not_recompile(tiny):
    jaxinfer.generate(tiny, random_prompts(tiny.cfg.vocab_size, [5, 9]), max_new_tokens=10, sampling=GREEDY)
    sizes = (prefill._cache_size(), generate_loop._cache_size())
    for lengths, max_new in (([12, 2], 7), ([3, 16], 16), ([7, 1], 1)):
        jaxinfer.generate(tiny, random_prompts(tiny.cfg.vocab_size, lengths), max_new_tokens=max_new, sampling=GREEDY)
    assert (prefill._cache_size(), generate_loop._cache_size()) == sizes
    # A longer prompt lands in the next bucket: exactly one new prefill program.
    jaxinfer.generate(tiny, random_prompts(tiny.cfg.vocab_size, [17, 3]), max_new_tokens=10, sampling=GREEDY)
    assert prefill._cache_size() == sizes[0] + 1


def test_stop_token_and_length_limits(tiny):
    (prompt,) = random_prompts(tiny.cfg.vocab_size, [6], seed=4)
    (free,) = jaxinfer.generate(tiny, [prompt], max_new_tokens=12, sampling=GREEDY)
    assert len(free.tokens) == 12 and free.finish_reason == "length"
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    (stopped,) = jaxinfer.generate(
        tiny, [prompt], max_new_tokens=12, sampling=jaxinfer.SamplingParams(temperature=0.0, stop_token_ids=[stop])
    )
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"


def test_eos_from_config_stops(tiny):
    (prompt,) = random_prompts(tiny.cfg.vocab_size, [6], seed=4)
    (free,) = jaxinfer.generate(tiny, [prompt], max_new_tokens=12, sampling=GREEDY)
    eos_model = jaxinfer.Model(tiny.cfg.replace(eos_token_ids=(free.tokens[2],)), tiny.params)
    (out,) = jaxinfer.generate(eos_model, [prompt], max_new_tokens=12, sampling=GREEDY)
    assert out.tokens == free.tokens[: free.tokens.index(free.tokens[2]) + 1] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny):
    prompts = random_prompts(tiny.cfg.vocab_size, [5, 5], seed=5)
    params = jaxinfer.SamplingParams(temperature=1.0, top_k=50, top_p=0.95)
    a = jaxinfer.generate(tiny, prompts, max_new_tokens=16, sampling=params, seed=1)
    b = jaxinfer.generate(tiny, prompts, max_new_tokens=16, sampling=params, seed=1)
    c = jaxinfer.generate(tiny, prompts, max_new_tokens=16, sampling=params, seed=2)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]
    assert a[0].tokens != a[1].tokens  # same prompt, different rows: different draws


def test_mixed_sampling_batch_keeps_greedy_rows_greedy(tiny):
    prompts = random_prompts(tiny.cfg.vocab_size, [5, 9], seed=6)
    alone = jaxinfer.generate(tiny, prompts[:1], max_new_tokens=16, sampling=GREEDY)
    mixed = jaxinfer.generate(
        tiny, prompts, max_new_tokens=16, sampling=[GREEDY, jaxinfer.SamplingParams(temperature=0.8)], seed=3
    )
    assert mixed[0].tokens == alone[0].tokens


def test_bfloat16_within_tolerance_of_float32(hf_checkpoint):
    path, _ = hf_checkpoint("llama3")
    m32 = jaxinfer.load_model(path, dtype="float32")
    m16 = jaxinfer.load_model(path, dtype="bfloat16")
    assert m16.params.embed.dtype == jax.numpy.bfloat16
    (ids,) = random_prompts(m32.cfg.vocab_size, [24], seed=7)
    l32, l16 = jaxinfer.score(m32, ids), jaxinfer.score(m16, ids)
    assert np.abs(l32 - l16).max() < 0.1 * np.abs(l32).max()
    # vLLM's rule: equal until the first difference, from there each token in the other's top-5.
    (o32,) = jaxinfer.generate(m32, [ids], max_new_tokens=16, sampling=GREEDY)
    (o16,) = jaxinfer.generate(m16, [ids], max_new_tokens=16, sampling=GREEDY)
    diverged = next((i for i, (a, b) in enumerate(zip(o32.tokens, o16.tokens)) if a != b), None)
    if diverged is not None:
        top5 = np.argsort(jaxinfer.score(m32, ids + o16.tokens[:diverged])[-1])[-5:]
        assert o16.tokens[diverged] in top5


BAD_REQUESTS = [
    (dict(prompts=[[]]), "prompts\\[0\\] is empty"),
    (dict(prompts=[[1, 2], [3, 999]]), "token id 999"),
    (dict(prompts=[[1, -1]]), "token id -1"),
    (dict(prompts=[[1] * 500], max_new_tokens=32), "max_new_tokens=32 exceeds"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(sampling="greedy"), "sampling"),
    (dict(prompts=[[5, 6, 7], [1] * 20], num_pages=2), "num_pages=2"),
    (dict(prompts="hello"), "prompts must be"),
    (dict(prompts=["hello"]), "no tokenizer"),
]


@pytest.mark.parametrize("bad, message", BAD_REQUESTS)
def test_bad_request_is_a_clear_error_and_breaks_nothing(tiny, bad, message):
    good = dict(prompts=[[5, 6, 7]], max_new_tokens=8, sampling=GREEDY)
    before = jaxinfer.generate(tiny, **good)
    with pytest.raises(ValueError, match=message):
        jaxinfer.generate(tiny, **{**good, **bad})
    assert jaxinfer.generate(tiny, **good) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(top_k=-1), "top_k")],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxinfer.SamplingParams(**kwargs)


def test_score_rejects_bad_ids(tiny):
    with pytest.raises(ValueError, match="token id 256"):
        jaxinfer.score(tiny, [1, 256])


def test_real_size_configs_trace_without_memory():
    for name in ("llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m"):
        cfg = jaxinfer.ModelConfig.preset(name)
        params = model_lib.abstract_params(cfg)
        n = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
        assert n == roofline.param_count(cfg)
        cache = jax.eval_shape(
            lambda: kv_cache.init_cache(cfg, num_pages=64, page_size=16, max_seqs=2, pages_per_seq=32)
        )
        logits, _ = jax.eval_shape(
            lambda p, c: _prefill(p, cfg, jax.numpy.zeros((2, 16), "int32"), jax.numpy.zeros((2, 16), "int32"),
                                      c, jax.numpy.arange(2)), params, cache)
        assert logits.shape == (2, cfg.vocab_size)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_stream_yields_exactly_the_generate_tokens(tiny, chunk_tokens):
    prompts = random_prompts(tiny.cfg.vocab_size, [4, 11, 7], seed=8)
    (probe,) = jaxinfer.generate(tiny, prompts[1:2], max_new_tokens=20, sampling=GREEDY)
    sampling = [GREEDY, jaxinfer.SamplingParams(temperature=0.0, stop_token_ids=[probe.tokens[6]]),
                jaxinfer.SamplingParams(temperature=0.9, top_k=20)]
    expected = jaxinfer.generate(tiny, prompts, max_new_tokens=20, sampling=sampling, seed=4)
    streamed = [[] for _ in prompts]
    finish = [None] * len(prompts)
    chunks = list(jaxinfer.generate_stream(tiny, prompts, max_new_tokens=20, sampling=sampling, seed=4,
                                           chunk_tokens=chunk_tokens))
    for chunk in chunks:
        for i, new in enumerate(chunk.new_tokens):
            assert finish[i] is None or not new, "tokens after a row finished"
            streamed[i] += new
        finish = [f or r for f, r in zip(finish, chunk.finish_reasons)]
    assert streamed == [o.tokens for o in expected]
    assert finish == [o.finish_reason for o in expected] and finish[1] == "stop"
    assert len(chunks) >= 20 // chunk_tokens


def test_stream_validates_before_any_work(tiny):
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        next(jaxinfer.generate_stream(tiny, [[1, 2]], chunk_tokens=0))
    with pytest.raises(ValueError, match="token id 300"):
        next(jaxinfer.generate_stream(tiny, [[1, 300]]))


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_pallas_kernels_in_interpret_mode_give_the_reference_tokens(sliding_window):
    # The kernels take head_dim 64 or 128.
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(head_dim=64, sliding_window=sliding_window)
    model = jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(1), scale=0.1))
    prompts = random_prompts(cfg.vocab_size, [3, 20], seed=9)
    ref = jaxinfer.generate(model, prompts, max_new_tokens=12, sampling=GREEDY, attention_backend="reference")
    ker = jaxinfer.generate(model, prompts, max_new_tokens=12, sampling=GREEDY, attention_backend="pallas-interpret")
    assert [o.tokens for o in ker] == [o.tokens for o in ref]
    ids = prompts[1]
    np.testing.assert_allclose(jaxinfer.score(model, ids, attention_backend="pallas-interpret"),
                               jaxinfer.score(model, ids), atol=1e-5, rtol=0)


def test_unknown_attention_backend_is_named(tiny):
    with pytest.raises(ValueError, match="backend='cudnn'"):
        jaxinfer.generate(tiny, [[1, 2]], max_new_tokens=2, attention_backend="cudnn")
