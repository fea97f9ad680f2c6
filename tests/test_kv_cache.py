"""The paged cache: page layout does not change results; chunking does not change results; allocator invariants."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE

import jaxinfer
from jaxinfer import kv_cache, model
from jaxinfer.page_allocator import PageAllocator, PagePoolExhausted
from jaxinfer.runtime import Runtime

PAGE_SIZE = 4
forward = jax.jit(model.forward, static_argnames=("cfg", "runtime"), donate_argnames=("cache",))
# (attention backend, layer layout): the plain-XLA blocked attention (the default), the gather-everything
# reference, each over the stacked (scanned) layers, and the blocked attention over unrolled layers.
VARIANTS = [("xla", "scanned"), ("reference", "scanned"), ("xla", "unrolled")]
VARIANT_IDS = [f"{b}-{layout}" for b, layout in VARIANTS]


@pytest.fixture(scope="module")
def tiny():
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(sliding_window=None)
    return cfg, model.init_params(cfg, jax.random.key(0), scale=0.1)


def make_cache(cfg, page_tables: np.ndarray, num_pages: int, fill=0.0):
    cache = kv_cache.init_cache(
        cfg, num_pages=num_pages, page_size=PAGE_SIZE, max_seqs=page_tables.shape[0], pages_per_seq=page_tables.shape[1]
    )
    k_pages, v_pages = jnp.full_like(cache.k_pages, fill), jnp.full_like(cache.v_pages, fill)  # [L, K, P, ps, H]
    return dataclasses.replace(cache, k_pages=k_pages, v_pages=v_pages, page_table=jnp.asarray(page_tables, jnp.int32))


def run_chunks(cfg, params, tokens: np.ndarray, chunks: list[int], cache, variant=("reference", "scanned")):
    """Feed tokens [B, T] through forward chunk by chunk -> logits [B, T, V]."""
    backend, layout = variant
    runtime, params = Runtime(attention_backend=backend), model.with_layout(params, layout)
    out, start = [], 0
    seq_ids = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    for n in chunks:
        positions = np.broadcast_to(np.arange(start, start + n, dtype=np.int32), (tokens.shape[0], n))
        logits, cache = forward(params, cfg, tokens[:, start : start + n], positions, cache, seq_ids, runtime=runtime)
        out.append(np.asarray(logits))
        start += n
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_permuted_pages_with_nan_slots_equal_contiguous(tiny, sliding_window, variant):
    cfg, params = tiny
    cfg = cfg.replace(sliding_window=sliding_window)
    B, T, pages_per_seq = 3, 21, 6
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    contiguous = np.arange(B * pages_per_seq).reshape(B, pages_per_seq)
    expected = run_chunks(cfg, params, tokens, [T], make_cache(cfg, contiguous, B * pages_per_seq))

    num_pages = 40  # a larger pool: most pages belong to nobody and hold NaN
    permuted = np.random.default_rng(1).permutation(num_pages)[: B * pages_per_seq].reshape(B, pages_per_seq)
    got = run_chunks(cfg, params, tokens, [T], make_cache(cfg, permuted, num_pages, fill=np.nan), variant)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE["model"]["float32"], rtol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunks", [[1] * 19, [5, 7, 7], [3, 16]])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_chunked_and_token_by_token_equal_one_prefill(tiny, chunks, sliding_window, variant):
    cfg, params = tiny
    cfg = cfg.replace(sliding_window=sliding_window)
    B, T = 2, sum(chunks)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    table = np.arange(B * 5).reshape(B, 5)
    expected = run_chunks(cfg, params, tokens, [T], make_cache(cfg, table, B * 5))
    got = run_chunks(cfg, params, tokens, chunks, make_cache(cfg, table, B * 5), variant)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE["model"]["float32"], rtol=0)


def test_write_touches_only_its_layer_and_addresses():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    cache = make_cache(cfg, np.array([[2, 0], [1, 3]]), 4)
    k = jnp.arange(2 * 3 * K * H, dtype=jnp.float32).reshape(2, 3, K, H) + 1  # [B, T, K, H]
    positions = jnp.array([[4, 5, -1], [0, 1, 2]], jnp.int32)
    k_pages, v_pages = kv_cache.write(cache.k_pages, cache.v_pages, k, -k, cache.page_table, positions, 1)
    k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)  # [L, K, P, page_size, H]
    expected = np.zeros_like(k_pages)
    # row 0: positions 4, 5 -> its block 1 = page 0, slots 0, 1; row 1: positions 0-2 -> page 1, slots 0-2
    expected[1, :, 0, 0], expected[1, :, 0, 1] = k[0, 0], k[0, 1]
    for t in range(3):
        expected[1, :, 1, t] = k[1, t]
    np.testing.assert_array_equal(k_pages, expected)
    np.testing.assert_array_equal(v_pages, -expected)
    assert k_pages.shape == (L, K, 4, PAGE_SIZE, H)


def test_padding_writes_nothing(tiny):
    cfg, params = tiny
    table = np.arange(8).reshape(2, 4)
    cache = make_cache(cfg, table, 8, fill=np.nan)
    tokens = np.ones((2, 6), np.int32)
    positions = np.array([[0, 1, 2, -1, -1, -1], [-1] * 6], np.int32)
    _, cache = forward(params, cfg, tokens, positions, cache, jnp.arange(2, dtype=jnp.int32))
    k = np.asarray(cache.k_pages[0])  # [K, P, page_size, H]
    assert np.isfinite(k[:, 0, :3]).all()
    assert np.isnan(k[:, 0, 3:]).all() and np.isnan(k[:, 1:]).all()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 0])


def test_allocator_never_shares_a_page_and_frees_back():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=64, page_size=16, pages_per_seq=8)
    live: dict[int, int] = {}
    for _ in range(500):
        seq = int(rng.integers(0, 12))
        if seq in live and rng.random() < 0.4:
            alloc.free(seq)
            del live[seq]
        else:
            tokens = live.get(seq, 0) + int(rng.integers(0, 40))
            try:
                alloc.reserve({seq: tokens})
                live[seq] = tokens
            except PagePoolExhausted:
                pass
        owned = [p for s in live for p in alloc.pages(s)]
        assert len(owned) == len(set(owned)), "a page is given to two live sequences"
        assert len(owned) + alloc.num_free == alloc.num_pages
        for s, tokens in live.items():
            assert len(alloc.pages(s)) >= alloc.pages_needed(tokens)


def test_allocator_exhaustion_is_explicit_and_changes_nothing():
    alloc = PageAllocator(num_pages=4, page_size=16, pages_per_seq=4)
    alloc.reserve({0: 20})
    before = (alloc.num_free, alloc.pages(0))
    with pytest.raises(PagePoolExhausted, match="num_pages=4"):
        alloc.reserve({1: 16, 2: 40})  # 1 + 3 pages > the 2 free
    assert (alloc.num_free, alloc.pages(0), alloc.pages(1)) == (*before, [])
    with pytest.raises(PagePoolExhausted, match="pages_per_seq=4"):
        alloc.reserve({3: 65})
    table = alloc.page_table(4)
    assert table.shape == (4, 4) and table[0, :2].tolist() == alloc.pages(0)


def test_allocator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="page_size=0"):
        PageAllocator(num_pages=4, page_size=0, pages_per_seq=1)
    with pytest.raises(ValueError, match="num_tokens=-1"):
        PageAllocator(num_pages=4, page_size=4, pages_per_seq=1).reserve({0: -1})
