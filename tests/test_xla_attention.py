"""jaxinfer.xla_attention.blocked_attention (the default attention backend) against the reference and the spec.

The same adversarial cases as the kernels' tests (tests/test_flash_attention.make_case: permuted page tables with
garbage tails, NaN in every unwritten slot, ragged lengths, padded rows), at key-block sizes from one page to
more than the whole table, so the loop runs zero, one and many iterations and starts past 0 under a window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOLERANCE
from jaxinfer.xla_attention import blocked_attention, visible_range
from pallas_kernels.reference import attention_reference
from test_flash_attention import assert_matches_reference, make_case, numpy_attention, ragged_prompts

TOL = TOLERANCE["xla_attention"]


def check(args, *, sliding_window=None, block_keys):
    out = blocked_attention(*args, sliding_window=sliding_window, block_keys=block_keys)
    assert_matches_reference(out, args, sliding_window, TOL)


CHUNKS = [
    (0, 1), (0, 15), (0, 17), (5, 9),  # whole prompts and a chunk starting mid-page
    (2 * 16, 16 + 1),  # a chunk on a page boundary, past a cached prefix
    (3, 4, 40),  # keys written past the chunk: causally invisible
    (0, 0, 0),  # a padding row: no query, no key
]


@pytest.mark.parametrize("block_keys", [16, 32, 48, 4096], ids=lambda b: f"block{b}")  # 4096: one block, no loop
@pytest.mark.parametrize("window", [None, 7, 20])
@pytest.mark.parametrize("dtype,group,num_kv_heads", [("float32", 3, 2), ("float32", 1, 1), ("bfloat16", 4, 2)])
def test_matches_reference(dtype, group, num_kv_heads, window, block_keys):
    args = make_case(1, dtype=dtype, head_dim=32, num_kv_heads=num_kv_heads, group=group, page_size=16,
                     chunks=CHUNKS)
    check(args, sliding_window=window, block_keys=block_keys)


@pytest.mark.parametrize("page_size", [4, 16])
def test_decode_rows_and_ragged_prompts(page_size):
    """T = 1 (a decode step over ragged lengths) and whole ragged prompts, block_keys not a multiple of the page."""
    decode = make_case(2, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=page_size,
                       chunks=[(0, 1), (page_size - 1, 1), (page_size, 1), (3 * page_size + 2, 1)])
    check(decode, block_keys=page_size * 2 + 1)
    prompts = make_case(3, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=page_size,
                        chunks=ragged_prompts(page_size))
    check(prompts, sliding_window=5, block_keys=page_size)


def test_is_the_attention_spec():
    args = make_case(5, dtype="float32", head_dim=64, num_kv_heads=2, group=2, page_size=16,
                     chunks=[(0, 17), (9, 8), (0, 0, 0)])
    out = np.asarray(blocked_attention(*args, sliding_window=5, block_keys=16))
    tol = TOL["float32"]
    np.testing.assert_allclose(out, numpy_attention(*args, 5), atol=tol, rtol=tol)


def test_stacked_pages_read_the_given_layer():
    args = make_case(6, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=16, chunks=[(0, 9), (4, 3)])
    q, k_pages, v_pages, *rest = args
    noise = jnp.full_like(k_pages, jnp.nan)  # the other layers' pools: never read
    k_stacked, v_stacked = jnp.stack([noise, k_pages, noise]), jnp.stack([noise, v_pages, noise])
    got = blocked_attention(q, k_stacked, v_stacked, *rest, layer=jnp.int32(1), block_keys=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(blocked_attention(*args, block_keys=16)))


def test_visible_range_bounds_the_blocks_read():
    positions = jnp.array([[40, 41, 42, -1], [-1, -1, -1, -1], [7, 8, -1, -1]], jnp.int32)
    lengths = jnp.array([43, 0, 100], jnp.int32)  # row 2 has keys written past its queries
    lo, hi = visible_range(positions, lengths, None)
    assert (int(lo), int(hi)) == (0, 43)
    lo, hi = visible_range(positions, lengths, 10)
    assert (int(lo), int(hi)) == (0, 43)  # row 2's first query (7) sees back to 0
    lo, hi = visible_range(positions[:1], lengths[:1], 10)
    assert (int(lo), int(hi)) == (31, 43)
    lo, hi = visible_range(positions[1:2], lengths[1:2], 10)  # nothing to see: an empty loop
    assert int(hi) <= int(lo) or int(hi) == 0


def test_reads_only_the_visible_blocks():
    """A chunk at positions 40..42 under a window of 8 never reads blocks 0-1 (keys 0-31): +inf in their V (written
    slots, so not zeroed) changes nothing here, while the gather-everything reference, which reads every page and
    multiplies their zero probabilities by inf, turns NaN."""
    args = list(make_case(7, dtype="float32", head_dim=16, num_kv_heads=1, group=1, page_size=16,
                          chunks=[(40, 3)]))
    expected = np.asarray(blocked_attention(*args, sliding_window=8, block_keys=16))
    v_pages = np.array(args[2])
    for page in np.asarray(args[3])[0, :2]:
        v_pages[:, page] = np.inf
    args[2] = jnp.asarray(v_pages)
    got = np.asarray(blocked_attention(*args, sliding_window=8, block_keys=16))
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all()
    assert not np.isfinite(np.asarray(attention_reference(*args, sliding_window=8))).all()


def test_jits_with_traced_positions():
    args = make_case(8, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=16, chunks=[(0, 20), (5, 3)])
    jitted = jax.jit(lambda *a: blocked_attention(*a, sliding_window=6, block_keys=16))
    tol = TOL["float32"]
    np.testing.assert_allclose(np.asarray(jitted(*args)),
                               np.asarray(attention_reference(*args, sliding_window=6)), atol=tol, rtol=tol)
