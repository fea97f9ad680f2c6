"""pallas_kernels/paged_attention.py against pallas_kernels.reference: interpret mode on the CPU, compiled on a GPU.

Both bodies: the generic one ("triton") in the HLO interpreter on any jax, the Mosaic GPU one ("mosaic")
in Mosaic GPU's interpreter on jax >= 0.11 (CI runs these in its jax 0.11.2 stage); both are lowered for
CUDA on the CPU with every jax.

Adversarial caches: randomly permuted page tables, ragged lengths (1, page-1, page, page+1, max), every
slot and page that is not written filled with NaN, and page-table entries past a sequence's pages
pointing at NaN pages, at -1 or past the pool.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOLERANCE, lower_for_h100
from pallas_kernels.mosaic_common import interpreter_available
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference

TOL = TOLERANCE["paged_attention"]


def make_case(seed, *, dtype, head_dim, q_per_kv, page_size, pages_per_seq, num_kv_heads=2, lengths=None):
    """(q, k_pages, v_pages, page_table, q_positions, kv_lengths): only slots below each sequence's length are
    finite; each query sits at its sequence's last written key (length - 1), as in a decode step."""
    rng = np.random.default_rng(seed)
    max_len = pages_per_seq * page_size
    if lengths is None:
        lengths = [1, page_size - 1, page_size, page_size + 1, max_len]
    B, K, H = len(lengths), num_kv_heads, head_dim
    N = K * q_per_kv
    P = B * pages_per_seq + 3  # a few pages nobody owns
    k_pages = np.full((K, P, page_size, H), np.nan, np.float32)  # [K, P, page_size, H]
    v_pages = np.full((K, P, page_size, H), np.nan, np.float32)  # [K, P, page_size, H]
    page_table = rng.permutation(P)[: B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    for b, n in enumerate(lengths):
        for pos in range(n):
            page, slot = page_table[b, pos // page_size], pos % page_size
            k_pages[:, page, slot] = rng.standard_normal((K, H))
            v_pages[:, page, slot] = rng.standard_normal((K, H))
        used = -(-n // page_size)
        garbage = rng.choice([-1, P + 5, page_table[b, -1]], size=pages_per_seq - used)
        page_table[b, used:] = garbage  # may point outside the pool; never read into the result
    q = rng.standard_normal((B, N, H)).astype(np.float32)
    as_dtype = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    lengths = jnp.asarray(lengths, jnp.int32)
    return as_dtype(q), as_dtype(k_pages), as_dtype(v_pages), jnp.asarray(page_table), lengths - 1, lengths


def assert_matches(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    tol = TOL[jnp.dtype(dtype).name]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


# (dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits, pages_per_block): every
# (dtype, head_dim, q_per_kv, page_size) for float32 and bfloat16, with the window on or off, 1-3 splits
# and 1-4 pages per block spread across them, then a few edge cases.
CASES = [
    ("float32", 64, 1, 16, None, 1, 1),
    ("float32", 64, 1, 64, 70, 2, 1),
    ("float32", 64, 4, 16, 20, 2, 2),
    ("float32", 64, 4, 64, None, 3, 2),
    ("float32", 64, 8, 16, None, 3, 4),
    ("float32", 64, 8, 64, 70, 1, 2),
    ("float32", 128, 1, 16, 20, 3, 2),
    ("float32", 128, 1, 64, None, 1, 2),
    ("float32", 128, 4, 16, None, 1, 4),
    ("float32", 128, 4, 64, 70, 3, 1),
    ("float32", 128, 8, 16, 20, 2, 1),
    ("float32", 128, 8, 64, None, 2, 1),
    ("bfloat16", 64, 1, 16, 20, 2, 4),
    ("bfloat16", 64, 1, 64, None, 3, 1),
    ("bfloat16", 64, 4, 16, None, 1, 1),
    ("bfloat16", 64, 4, 64, 70, 2, 2),
    ("bfloat16", 64, 8, 16, 20, 3, 2),
    ("bfloat16", 64, 8, 64, None, 1, 2),
    ("bfloat16", 128, 1, 16, None, 2, 2),
    ("bfloat16", 128, 1, 64, 70, 1, 1),
    ("bfloat16", 128, 4, 16, 20, 3, 4),
    ("bfloat16", 128, 4, 64, None, 2, 1),
    ("bfloat16", 128, 8, 16, None, 1, 1),
    ("bfloat16", 128, 8, 64, 70, 3, 2),
    ("float16", 64, 8, 16, 33, 2, 2),
    ("float32", 64, 4, 16, 1, 2, 2),  # window 1: each query sees only itself
    ("bfloat16", 64, 8, 16, 33, 5, 1),  # one page per split
]


@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block", CASES)
def test_matches_reference(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits, pages_per_block):
    # pages_per_seq 5 (page 16) does not divide into blocks of 2 or 4 pages: the padded tail is exercised.
    pages_per_seq = 5 if page_size == 16 else 3
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=pages_per_seq)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=num_splits,
                          pages_per_block=pages_per_block, interpret=True)
    assert_matches(out, paged_attention_reference(*args, sliding_window=sliding_window), dtype)


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_explicit_q_positions(sliding_window):
    """Length 0 and position -1 give zeros; a query before the last written key ignores the keys after it."""
    q, k_pages, v_pages, page_table, _, kv_lengths = make_case(
        1, dtype="float32", head_dim=64, q_per_kv=4, page_size=16, pages_per_seq=5, lengths=[0, 5, 40, 80, 80])
    q_positions = jnp.asarray([-1, -1, 39, 50, 17], jnp.int32)
    args = (q, k_pages, v_pages, page_table, q_positions, kv_lengths)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=2, pages_per_block=2, interpret=True)
    assert_matches(out, paged_attention_reference(*args, sliding_window=sliding_window), "float32")
    np.testing.assert_array_equal(np.asarray(out[:2]), 0.0)


def test_default_block_sizes_under_jit():
    """Tuned-table defaults, called from inside a user's jit with traced lengths and page table."""
    args = make_case(2, dtype="bfloat16", head_dim=64, q_per_kv=4, page_size=16, pages_per_seq=5)
    out = jax.jit(lambda *a: paged_attention(*a, interpret=True))(*args)
    assert_matches(out, paged_attention_reference(*args), "bfloat16")


def test_both_kernels_take_attentions_argument_order():
    """q, k_pages, v_pages, page_table, q_positions, kv_lengths: the order of jaxinfer.attention.attention, for
    both kernels, their references and their Mosaic GPU bodies (whose arguments are derived from those)."""
    from jaxinfer.attention import attention
    from pallas_kernels import flash_attention_mgpu, paged_attention_mgpu, reference
    from pallas_kernels.flash_attention import flash_attention

    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]

    order = positional(attention)
    assert order == ["q", "k_pages", "v_pages", "page_table", "q_positions", "kv_lengths"]
    for fn in (flash_attention, paged_attention, reference.attention_reference, reference.paged_attention_reference):
        assert positional(fn) == order, fn
    assert positional(flash_attention_mgpu.flash_attention_rows) == [
        "q_rows", "k_pages", "v_pages", "page_table", "row_positions", "kv_lengths"]
    assert positional(paged_attention_mgpu.paged_attention_partials) == [
        "q", "k_pages", "v_pages", "page_table", "lo", "hi"]  # lo, hi: the visible keys, from positions and lengths


_Q = jnp.zeros((2, 4, 64), jnp.float32)  # [B, N, H]
_PAGES = jnp.zeros((2, 6, 16, 64), jnp.float32)  # [K, P, page_size, H]
_GOOD = dict(q=_Q, k_pages=_PAGES, v_pages=_PAGES, page_table=jnp.zeros((2, 3), jnp.int32),
             q_positions=jnp.zeros((2,), jnp.int32), kv_lengths=jnp.ones((2,), jnp.int32), interpret=True)
# (the parameter the message must name, what replaces the good input)
BAD_INPUTS = [
    ("head_dim", dict(q=jnp.zeros((2, 4, 40)), k_pages=jnp.zeros((2, 6, 16, 40)), v_pages=jnp.zeros((2, 6, 16, 40)))),
    ("num_heads", dict(q=jnp.zeros((2, 3, 64)))),
    ("q.shape", dict(q=jnp.zeros((2, 1, 4, 64)))),
    ("v_pages.shape", dict(v_pages=jnp.zeros((2, 7, 16, 64)))),
    ("q.dtype", dict(q=_Q.astype(jnp.int32))),
    ("k_pages.dtype", dict(k_pages=_PAGES.astype(jnp.bfloat16))),
    ("page_table.shape", dict(page_table=jnp.zeros((3, 3), jnp.int32))),
    ("page_table.dtype", dict(page_table=jnp.zeros((2, 3), jnp.float32))),
    ("kv_lengths.shape", dict(kv_lengths=jnp.ones((3,), jnp.int32))),
    ("kv_lengths.dtype", dict(kv_lengths=jnp.ones((2,), jnp.float32))),
    ("q_positions.shape", dict(q_positions=jnp.zeros((2, 1), jnp.int32))),
    ("q_positions.dtype", {"q_positions": jnp.zeros((2,), jnp.float32)}),
    ("sliding_window", dict(sliding_window=0)),
    ("pages_per_block", dict(pages_per_block=3)),
    ("num_splits", dict(num_splits=0)),
    # Triton needs power-of-two tiles; checked before any lowering, so this runs without a GPU.
    ("page_size", dict(k_pages=jnp.zeros((2, 6, 24, 64)), v_pages=jnp.zeros((2, 6, 24, 64)), interpret=False)),
]


@pytest.mark.parametrize("name,change", BAD_INPUTS, ids=[name for name, _ in BAD_INPUTS])
def test_bad_inputs_raise(name, change):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        paged_attention(**{**_GOOD, **change})


# Lowering through Triton needs no GPU: this catches a primitive Triton cannot lower, or a tile that is
# not a power of two, in CI. It stops at Triton IR; Triton's own passes to PTX run only on the device.
LOWERING_CASES = [
    ("float32", 128, 1, 64, None, 2, 1),
    ("bfloat16", 128, 4, 16, 20, 3, 4),
    ("bfloat16", 64, 8, 64, 70, 2, 2),
    ("float16", 64, 8, 16, 33, 2, 2),
    ("bfloat16", 128, 8, 16, None, None, None),  # the tuned defaults
]


@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block",
                         LOWERING_CASES)
def test_lowers_to_triton(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits, pages_per_block):
    pytest.importorskip("jaxlib.triton.dialect")
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=5 if page_size == 16 else 3)
    fn = jax.jit(lambda *a: paged_attention(*a, sliding_window=sliding_window, num_splits=num_splits,
                                            pages_per_block=pages_per_block))
    hlo = lower_for_h100(fn, *args)
    assert "__gpu$xla.gpu.triton" in hlo


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas (Triton) needs a GPU")
@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block", CASES)
def test_compiled_on_gpu(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits, pages_per_block):
    pages_per_seq = 5 if page_size == 16 else 3
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=pages_per_seq)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=num_splits,
                          pages_per_block=pages_per_block)
    with jax.default_matmul_precision("highest"):  # XLA's float32 dots default to TF32 on the GPU
        ref = paged_attention_reference(*args, sliding_window=sliding_window)
    assert_matches(out, ref, dtype)
    assert_matches(paged_attention(*args), ref, dtype)  # the tuned defaults compile too


# The Mosaic GPU body takes 16-bit inputs and whole wgmma tiles of 64 keys a step: the 16-bit CASES, with
# pages_per_block raised to 64 keys (or twice that) where the case asks for fewer.
MOSAIC_CASES = [
    (dtype, head_dim, q_per_kv, page_size, window, splits, max(ppb, 64 // page_size) * (1 + (ppb == 4)))
    for dtype, head_dim, q_per_kv, page_size, window, splits, ppb in CASES if dtype != "float32"
]
needs_mosaic_interpreter = pytest.mark.skipif(
    not interpreter_available(), reason="Mosaic GPU's interpreter runs this body from jax 0.11 on")


@needs_mosaic_interpreter
@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block",
                         MOSAIC_CASES)
def test_mosaic_matches_reference(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits,
                                  pages_per_block):
    # page 16: 5 pages a sequence in blocks of 4 or 8 pages; page 64: 3 pages in blocks of 1 or 2.
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=5 if page_size == 16 else 3)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=num_splits,
                          pages_per_block=pages_per_block, implementation="mosaic", interpret=True)
    assert_matches(out, paged_attention_reference(*args, sliding_window=sliding_window), dtype)


@needs_mosaic_interpreter
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_mosaic_explicit_q_positions(sliding_window):
    """Length 0 / position -1 give zeros, a query before the last key ignores later keys, a window that
    starts mid-block hides the keys before it, with three ring slots and one block a step."""
    q, k_pages, v_pages, page_table, _, kv_lengths = make_case(
        1, dtype="bfloat16", head_dim=64, q_per_kv=4, page_size=16, pages_per_seq=9,
        lengths=[0, 5, 40, 140, 144])
    q_positions = jnp.asarray([-1, -1, 39, 100, 17], jnp.int32)
    args = (q, k_pages, v_pages, page_table, q_positions, kv_lengths)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=1, num_stages=3,
                          implementation="mosaic", interpret=True)
    assert_matches(out, paged_attention_reference(*args, sliding_window=sliding_window), "bfloat16")
    np.testing.assert_array_equal(np.asarray(out[:2], np.float32), 0.0)


MOSAIC_LOWERING_CASES = [
    ("bfloat16", 128, 4, 16, None, None, None),  # the defaults: the decode shape of the issue
    ("bfloat16", 64, 8, 64, 70, 2, 2),
    ("float16", 128, 1, 16, 33, 3, 8),
]


@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block",
                         MOSAIC_LOWERING_CASES)
def test_mosaic_lowers_for_cuda(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits,
                                pages_per_block):
    """Pallas' Mosaic GPU lowering (layouts, TMA descriptors, wgmma shapes) runs on the CPU for CUDA."""
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=5 if page_size == 16 else 3)
    fn = jax.jit(lambda *a: paged_attention(*a, sliding_window=sliding_window, num_splits=num_splits,
                                            pages_per_block=pages_per_block, implementation="mosaic"))
    hlo = lower_for_h100(fn, *args)
    assert "mosaic_gpu" in hlo and "triton" not in hlo


_BF16 = dict(q=_Q.astype(jnp.bfloat16), k_pages=_PAGES.astype(jnp.bfloat16), v_pages=_PAGES.astype(jnp.bfloat16))
MOSAIC_BAD_INPUTS = [
    ("float32", dict(implementation="mosaic")),  # not 16-bit
    ("page_size=20", dict(q=_Q.astype(jnp.bfloat16), k_pages=jnp.zeros((2, 6, 20, 64), jnp.bfloat16),
                          v_pages=jnp.zeros((2, 6, 20, 64), jnp.bfloat16), implementation="mosaic")),
    ("pages_per_block=2", dict(_BF16, pages_per_block=2, implementation="mosaic", interpret=False)),
    ("shared memory", dict(_BF16, pages_per_block=64, num_stages=4, implementation="mosaic", interpret=False)),
    ("implementation='cuda'", dict(implementation="cuda")),
]


@pytest.mark.parametrize("name,change", MOSAIC_BAD_INPUTS, ids=[name for name, _ in MOSAIC_BAD_INPUTS])
def test_mosaic_bad_inputs_raise(name, change):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        paged_attention(**{**_GOOD, **change})


@pytest.mark.skipif(interpreter_available(), reason="this jax's Mosaic GPU interpreter runs the body")
def test_mosaic_interpret_on_old_jax_names_the_version():
    with pytest.raises(ValueError, match=rf"jax {jax.__version__}"):
        paged_attention(**{**_GOOD, **_BF16, "pages_per_block": 4, "implementation": "mosaic"})


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Mosaic GPU needs a Hopper GPU")
@pytest.mark.parametrize("dtype,head_dim,q_per_kv,page_size,sliding_window,num_splits,pages_per_block",
                         MOSAIC_CASES)
def test_mosaic_compiled_on_gpu(dtype, head_dim, q_per_kv, page_size, sliding_window, num_splits,
                                pages_per_block):
    args = make_case(0, dtype=dtype, head_dim=head_dim, q_per_kv=q_per_kv, page_size=page_size,
                     pages_per_seq=5 if page_size == 16 else 3)
    out = paged_attention(*args, sliding_window=sliding_window, num_splits=num_splits,
                          pages_per_block=pages_per_block, implementation="mosaic")
    ref = paged_attention_reference(*args, sliding_window=sliding_window)
    assert_matches(out, ref, dtype)
    assert_matches(paged_attention(*args, implementation="mosaic"), ref, dtype)  # the tuned defaults
