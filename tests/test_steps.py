"""jaxinfer.steps, the device contract: chunked prefill keeps each row's logits, write_row fills one slot, the
layers scanned or unrolled compute the same, and a Runtime is a static, hashable key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import TOLERANCE
from jaxinfer import model as model_lib
from jaxinfer import steps
from jaxinfer.generate import allocate_cache
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingArrays, SamplingParams, row_keys


@pytest.fixture(scope="module")
def tiny():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    return cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1)


def _prefill_in_chunks(cfg, params, prompts, chunk, runtime=Runtime()):
    """(params in either layout)"""
    """prompts (ragged) -> (logits [B, V] after each row's last token, cache), chunk tokens per call."""
    B, longest = len(prompts), max(map(len, prompts))
    width = -(-longest // chunk) * chunk
    tokens, positions = np.zeros((B, width), np.int32), np.full((B, width), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)], positions[b, : len(p)] = p, np.arange(len(p))
    cache = allocate_cache(cfg, [len(p) for p in prompts], B, 64, 4, None)
    logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    seq_ids = jnp.arange(B, dtype=jnp.int32)
    for start in range(0, width, chunk):
        w = slice(start, start + chunk)
        logits, cache = steps.prefill(params, cfg, tokens[:, w], positions[:, w], cache, seq_ids, logits,
                                      runtime=runtime)
    return np.asarray(logits), cache


def test_prefill_chunks_keep_each_rows_last_logits(tiny):
    """Rows ending in different chunks (3, 8 and 21 tokens in chunks of 8) get the logits after their own last
    token: the same as one whole-prompt call, and as each row alone."""
    cfg, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 8, 21)]
    whole, _ = _prefill_in_chunks(cfg, params, prompts, 24)
    chunked, cache = _prefill_in_chunks(cfg, params, prompts, 8)
    tol = TOLERANCE["model"]["float32"]
    np.testing.assert_allclose(chunked, whole, atol=tol, rtol=0)
    assert np.asarray(cache.lengths).tolist() == [3, 8, 21]
    for b, p in enumerate(prompts):
        alone, _ = _prefill_in_chunks(cfg, params, [p], 8)
        np.testing.assert_allclose(alone[0], chunked[b], atol=tol, rtol=0)


def test_unrolled_layers_compute_the_scanned_values(tiny):
    cfg, params = tiny
    prompts = [np.random.default_rng(1).integers(0, cfg.vocab_size, 13).tolist()]
    scanned, _ = _prefill_in_chunks(cfg, params, prompts, 8)
    unrolled, _ = _prefill_in_chunks(cfg, model_lib.with_layout(params, "unrolled"), prompts, 8)
    np.testing.assert_allclose(unrolled, scanned, atol=TOLERANCE["model"]["float32"], rtol=0)


def _rows(B, temperatures, limit):
    params = [SamplingParams(temperature=t) for t in temperatures]
    return steps.RowSettings(
        seq_ids=jnp.arange(B, dtype=jnp.int32),
        sampling=SamplingArrays.from_params(params, B),
        keys=row_keys(0, B),
        stop_ids=jnp.full((B, 4), -1, jnp.int32),
        limits=jnp.full((B,), limit, jnp.int32),
    )


def _host(rows):
    """Every field as numpy (keys as their raw data)."""
    return jax.tree.leaves(jax.tree.map(np.asarray, dataclasses.replace(rows, keys=jax.random.key_data(rows.keys))))


def test_write_row_replaces_one_slot_only(compilations):
    rows = _rows(4, [0.0, 0.5, 0.0, 0.0], 8)
    before = _host(rows)
    one = dataclasses.replace(_rows(1, [0.9], 3), seq_ids=jnp.array([7], jnp.int32),
                              stop_ids=jnp.array([[5, 6, -1, -1]], jnp.int32), keys=row_keys([11], 1))
    rows = steps.write_row(rows, jnp.int32(2), one)
    for field_before, field_after, field_one in zip(before, _host(rows), _host(one), strict=True):
        np.testing.assert_array_equal(field_after[[0, 1, 3]], field_before[[0, 1, 3]])
        np.testing.assert_array_equal(field_after[2], field_one[0])
    steps.write_row(rows, jnp.int32(0), one)  # another slot: the same program
    assert compilations["jit(_write_row)"] == 1


def test_runtime_is_a_static_hashable_key():
    assert Runtime() == Runtime(attention_backend=None, mesh=None)
    assert hash(Runtime(attention_backend="xla")) == hash(Runtime(attention_backend="xla"))
    assert Runtime(attention_backend="xla") != Runtime()
    with pytest.raises(ValueError, match="attention_backend='cudnn' must be one of"):
        Runtime(attention_backend="cudnn")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or None, not int"):
        Runtime(mesh=1)


def test_layouts_round_trip_and_bad_layout_is_named(tiny):
    cfg, params = tiny
    unrolled = model_lib.with_layout(params, "unrolled")
    assert isinstance(unrolled.layers, tuple) and len(unrolled.layers) == cfg.num_layers
    assert unrolled.layers[1].wq.shape == params.layers.wq.shape[1:]
    back = model_lib.with_layout(unrolled, "scanned")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="layout='stacked' must be one of"):
        model_lib.with_layout(params, "stacked")
    with pytest.raises(ValueError, match="layout='stacked' must be one of"):
        jaxinfer.random_model("tiny", layout="stacked")
