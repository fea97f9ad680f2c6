"""Sampling: hand-computed filter sets, parity with HF transformers' warpers, frequencies, seeds, batch invariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE

from jaxinfer.sampling import (
    SamplingArrays,
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    row_keys,
    sample,
    step_keys,
)

_filter = jax.jit(filter_logits)
RTOL = TOLERANCE["sampling"]["float32"]
_sample = jax.jit(sample)

# Probabilities float32 softmax reproduces exactly, so cumulative sums can land exactly on top_p.
EXACT_PROBS = np.array([0.125, 0.5, 0.125, 0.25])


def _arrays(*params: SamplingParams, batch_size: int | None = None) -> SamplingArrays:
    return SamplingArrays.from_params(list(params), batch_size or len(params))


def _kept(logits, params: SamplingParams) -> set[int]:
    """Token ids that survive filter_logits for a single row."""
    out = np.asarray(_filter(jnp.asarray(logits, jnp.float32)[None], _arrays(params)))[0]  # [V]
    return set(np.flatnonzero(np.isfinite(out)).tolist())


def _no_seen(batch_size: int, vocab_size: int) -> jax.Array:
    return jnp.zeros((batch_size, vocab_size), bool)


# --- greedy ---


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (8, 100))  # [B, V]
    tokens = _sample(logits, _arrays(SamplingParams(temperature=0.0), batch_size=8), row_keys(0, 8), _no_seen(8, 100))
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens.dtype == jnp.int32


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = jax.random.normal(jax.random.key(1), (6, 100))  # [B, V]
    # Greedy rows carry top-k/top-p settings too: they must be ignored for argmax rows.
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)
    hot = SamplingParams(temperature=5.0)
    arrays = _arrays(greedy, hot, greedy, hot, hot, greedy)
    tokens = np.asarray(_sample(logits, arrays, row_keys(3, 6), _no_seen(6, 100)))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(tokens[[0, 2, 5]], argmax[[0, 2, 5]])
    # At temperature 5 over 100 tokens, three rows all landing on their argmax would mean the hot rows were not sampled.
    assert (tokens[[1, 3, 4]] != argmax[[1, 3, 4]]).any()


def test_padding_rows_are_greedy():
    arrays = _arrays(SamplingParams(temperature=0.8, top_k=4), batch_size=3)
    np.testing.assert_array_equal(arrays.temperature, np.float32([0.8, 0.0, 0.0]))
    np.testing.assert_array_equal(arrays.top_k, [4, 0, 0])
    assert arrays.top_k.dtype == jnp.int32 and arrays.temperature.dtype == jnp.float32


def test_repetition_penalty_changes_greedy_choice():
    logits = jnp.array([[2.0, 1.9, -1.0], [-0.5, -0.4, -3.0]])  # [B, V]
    seen = jnp.array([[True, False, False], [False, True, False]])  # the argmax of each row was already generated
    arrays = _arrays(*[SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 2)
    np.testing.assert_array_equal(_sample(logits, arrays, row_keys(0, 2), seen), [1, 0])


# --- hand-computed filter sets ---


def test_exact_probs_are_exact_in_float32():
    # The top-p/min-p boundary cases below rely on this.
    probs = np.asarray(jax.nn.softmax(jnp.log(jnp.asarray(EXACT_PROBS, jnp.float32))))
    np.testing.assert_array_equal(probs, EXACT_PROBS.astype(np.float32))


@pytest.mark.parametrize(
    "logits, top_k, expected",
    [
        ([1.0, 3.0, 2.0, 0.0], 1, {1}),
        ([1.0, 3.0, 2.0, 0.0], 2, {1, 2}),
        ([1.0, 3.0, 2.0, 0.0], 4, {0, 1, 2, 3}),
        ([1.0, 3.0, 2.0, 0.0], 10, {0, 1, 2, 3}),  # k > V keeps everything
        ([1.0, 3.0, 2.0, 0.0], 0, {0, 1, 2, 3}),  # 0 = off
        ([3.0, 1.0, 3.0, 0.0], 1, {0, 2}),  # HF keeps ties with the k-th largest
        ([1.0, 2.0, 2.0, 0.0], 2, {1, 2}),
    ],
)
def test_top_k_keeps_k_largest(logits, top_k, expected):
    assert _kept(logits, SamplingParams(top_k=top_k)) == expected


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.5, {1}),  # the top token alone reaches 0.5 exactly: boundary, nothing else needed
        (0.50001, {1, 3}),
        (0.6, {1, 3}),
        (0.75, {1, 3}),  # 0.5 + 0.25 lands exactly on top_p: boundary, the 0.125 tokens go
        (0.9, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
        (1e-6, {1}),  # the most probable token always survives
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    assert _kept(np.log(EXACT_PROBS), SamplingParams(top_p=top_p)) == expected


def test_top_p_one_is_off_even_for_underflowed_tokens():
    # exp(-200) is 0 in float32; TopPLogitsWarper(1.0) would drop it (cumulative 0 <= 1 - 1), but generate() never
    # builds that warper for top_p=1, and off must mean off.
    assert _kept([0.0, -200.0, 1.0], SamplingParams(top_p=1.0)) == {0, 1, 2}


@pytest.mark.parametrize(
    "min_p, temperature, expected",
    [
        (0.0, 1.0, {0, 1, 2, 3}),
        (0.25, 1.0, {0, 1, 2, 3}),  # 0.125 >= 0.25 * 0.5: boundary, kept
        (0.5, 1.0, {1, 3}),  # 0.25 >= 0.5 * 0.5: boundary, kept
        (0.51, 1.0, {1}),
        (1.0, 1.0, {1}),
        # Temperature runs first: at T=2 probabilities go as sqrt, so 0.25 is sqrt(0.5) ~ 0.71 of the max.
        (0.6, 1.0, {1}),
        (0.6, 2.0, {1, 3}),
    ],
)
def test_min_p_keeps_tokens_above_scaled_max(min_p, temperature, expected):
    assert _kept(np.log(EXACT_PROBS), SamplingParams(min_p=min_p, temperature=temperature)) == expected


def test_filters_compose():
    logits = np.log([0.05, 0.4, 0.1, 0.3, 0.15])
    # top-k 4 drops 0.05; top-p 0.7 then needs 0.4 + 0.3 of the renormalized 0.95; min-p cannot bring tokens back.
    assert _kept(logits, SamplingParams(top_k=4, top_p=0.7, min_p=0.0)) == {1, 3}
    assert _kept(logits, SamplingParams(top_k=2, min_p=0.01)) == {1, 3}
    assert _kept(logits, SamplingParams(top_k=4, min_p=0.3)) == {1, 3, 4}


def test_filter_treats_temperature_zero_as_one():
    logits = jnp.asarray(np.log(EXACT_PROBS), jnp.float32)[None]  # [1, V]
    greedy = _filter(logits, _arrays(SamplingParams(temperature=0.0, top_p=0.75)))
    unit = _filter(logits, _arrays(SamplingParams(temperature=1.0, top_p=0.75)))
    np.testing.assert_array_equal(greedy, unit)


# --- parity with HF transformers ---

HF_SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=10, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=0.5, top_k=20, top_p=0.8, min_p=0.05),
    dict(temperature=2.0, top_k=5, top_p=0.95, min_p=0.2),
    dict(temperature=1.0, top_k=1, top_p=0.3, min_p=0.0),
    dict(temperature=0.9, top_k=50, top_p=0.6, min_p=0.3),
    dict(temperature=1.0, top_k=60, top_p=0.99, min_p=0.01),
]


def _hf_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """HF's warper chain, built with the same skip rules as GenerationMixin._get_logits_processor."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    warpers = []
    if temperature != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p))
    warpers.append(lp.MinPLogitsWarper(min_p))
    scores = torch.from_numpy(logits)
    input_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("setting", HF_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_filter_matches_hf_warpers(setting):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 50)).astype(np.float32)  # [B, V]
    expected = _hf_filter(logits, **setting)
    ours = np.asarray(_filter(jnp.asarray(logits), _arrays(*[SamplingParams(**setting)] * 4)))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=RTOL)


def test_filter_matches_hf_per_row_in_mixed_batch():
    logits = np.random.default_rng(1).normal(scale=2.0, size=(len(HF_SETTINGS), 50)).astype(np.float32)  # [B, V]
    ours = np.asarray(_filter(jnp.asarray(logits), _arrays(*[SamplingParams(**s) for s in HF_SETTINGS])))
    for row, setting in enumerate(HF_SETTINGS):
        expected = _hf_filter(logits[row : row + 1], **setting)[0]
        np.testing.assert_array_equal(np.isneginf(ours[row]), np.isneginf(expected), err_msg=str(setting))


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_matches_hf(penalty):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(4, 50)).astype(np.float32)  # [B, V]
    input_ids = rng.integers(0, 50, size=(4, 12))  # [B, L], with repeats
    seen = np.zeros((4, 50), bool)  # [B, V]
    np.put_along_axis(seen, input_ids, True, axis=-1)
    processor = lp.RepetitionPenaltyLogitsProcessor(penalty)
    expected = processor(torch.from_numpy(input_ids), torch.from_numpy(logits.copy()))
    ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.full((4,), penalty, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=RTOL)


# --- sampled frequencies ---

FREQ_PROBS = np.array([0.1, 0.2, 0.3, 0.4])
NUM_DRAWS = 20_000


def _draw(params: SamplingParams, seed: int) -> np.ndarray:
    """NUM_DRAWS samples from FREQ_PROBS: one row per draw, each with its own key."""
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(FREQ_PROBS, jnp.float32)), (NUM_DRAWS, len(FREQ_PROBS)))  # [B, V]
    arrays = _arrays(*[params] * NUM_DRAWS)
    return np.asarray(_sample(logits, arrays, row_keys(seed, NUM_DRAWS), _no_seen(NUM_DRAWS, len(FREQ_PROBS))))


def _assert_frequencies(tokens: np.ndarray, probs: np.ndarray):
    counts = np.bincount(tokens, minlength=len(probs))
    stderr = np.sqrt(probs * (1 - probs) / len(tokens))
    np.testing.assert_array_less(np.abs(counts / len(tokens) - probs), 4 * stderr + 1e-12)


def test_sample_frequencies_match_distribution():
    _assert_frequencies(_draw(SamplingParams(temperature=1.0), seed=0), FREQ_PROBS)


def test_sample_frequencies_with_top_k():
    tokens = _draw(SamplingParams(temperature=1.0, top_k=2), seed=1)
    assert not np.isin(tokens, [0, 1]).any()
    _assert_frequencies(tokens, np.array([0.0, 0.0, 3 / 7, 4 / 7]))


def test_sample_frequencies_with_temperature():
    # T=0.5 squares the probabilities before renormalizing.
    expected = FREQ_PROBS**2 / np.sum(FREQ_PROBS**2)
    _assert_frequencies(_draw(SamplingParams(temperature=0.5), seed=2), expected)


# --- seeds and keys ---


def _hot_batch(seed: int, keys: jax.Array | None = None) -> np.ndarray:
    logits = jax.random.normal(jax.random.key(42), (64, 200))  # [B, V]
    keys = row_keys(seed, 64) if keys is None else keys
    arrays = _arrays(*[SamplingParams(temperature=1.5)] * 64)
    return np.asarray(_sample(logits, arrays, keys, _no_seen(64, 200)))


def test_same_seed_same_tokens_other_seed_differs():
    np.testing.assert_array_equal(_hot_batch(7), _hot_batch(7))
    assert (_hot_batch(7) != _hot_batch(8)).any()


def test_step_keys_give_fresh_streams():
    keys = row_keys(7, 64)
    step3 = _hot_batch(7, step_keys(keys, 3))
    np.testing.assert_array_equal(step3, _hot_batch(7, jax.jit(step_keys)(keys, jnp.int32(3))))
    assert (step3 != _hot_batch(7, step_keys(keys, 4))).any()
    assert (step3 != _hot_batch(7, keys)).any()


def test_raw_uint32_keys_are_accepted():
    raw = jax.random.split(jax.random.PRNGKey(0), 64)  # [B, 2] uint32
    tokens = _hot_batch(0, raw)
    assert tokens.shape == (64,)
    np.testing.assert_array_equal(tokens, _hot_batch(0, jax.random.wrap_key_data(raw)))


# --- validation ---


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="1.0"), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(min_p=math.nan), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(stop_token_ids=[2, -1]), "stop_token_ids"),
        (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    ],
)
def test_bad_params_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_params_normalize_and_greedy():
    params = SamplingParams(temperature=0, top_k=np.int64(3), stop_token_ids=[2, 7])
    assert params.stop_token_ids == (2, 7) and params.greedy
    assert isinstance(params.temperature, float) and isinstance(params.top_k, int)
    assert not SamplingParams().greedy
    assert hash(params) == hash(SamplingParams(temperature=0.0, top_k=3, stop_token_ids=(2, 7)))


def test_from_params_rejects_oversized_batch():
    with pytest.raises(ValueError, match="batch_size"):
        SamplingArrays.from_params([SamplingParams()] * 3, 2)


# --- batch invariance ---


def test_row_is_batch_invariant():
    vocab_size = 300
    logits = jax.random.normal(jax.random.key(5), (8, vocab_size)) * 2.0  # [B, V]
    seen = jax.random.bernoulli(jax.random.key(6), 0.1, (8, vocab_size))  # [B, V]
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.3, top_p=0.5, repetition_penalty=1.5),
        SamplingParams(temperature=2.0, min_p=0.2),
    ]
    probes = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),  # alone: the all-greedy branch; batched: mixed
    ]
    row = 5
    for probe in probes:
        params = others + [others[0], probe, others[1], others[2]]
        batched_arrays = _arrays(*params)
        alone_arrays = _arrays(probe)
        for seed in range(12):
            keys = row_keys(seed, 8)
            batched = _sample(logits, batched_arrays, keys, seen)[row]
            alone = _sample(logits[row : row + 1], alone_arrays, keys[row : row + 1], seen[row : row + 1])[0]
            assert int(batched) == int(alone), (probe, seed)
