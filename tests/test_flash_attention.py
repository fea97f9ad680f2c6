"""pallas_kernels.flash_attention against pallas_kernels.reference: interpret mode on the CPU, compiled on a GPU.

Both bodies: the generic one ("triton") in the HLO interpreter on any jax, the Mosaic GPU one ("mosaic")
in Mosaic GPU's interpreter on jax >= 0.11 (CI's jax 0.11.2 stage); both are lowered for CUDA on the CPU.

Adversarial data throughout: randomly permuted page tables whose tail entries point anywhere, ragged lengths
(1, page-1, page, page+1, max), NaN in every cache slot no sequence has written, padded (-1) query rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOLERANCE, lower_for_h100
from jaxinfer.attention import attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.mosaic_common import interpreter_available
from pallas_kernels.reference import attention_reference

TOL = TOLERANCE["flash_attention"]


def make_case(seed, *, dtype, head_dim, num_kv_heads, group, page_size, chunks, extra_pages=2):
    """chunks: per sequence (start, length) or (start, length, kv_length); queries are positions start..start+length-1.

    Returns (q, k_pages, v_pages, page_table, q_positions, kv_lengths) with NaN in every unwritten slot.
    """
    rng = np.random.default_rng(seed)
    chunks = [c if len(c) == 3 else (*c, c[0] + c[1]) for c in chunks]
    B, K, H, N = len(chunks), num_kv_heads, head_dim, num_kv_heads * group
    T = max(length for _, length, _ in chunks)
    needed = [-(-kv_length // page_size) for _, _, kv_length in chunks]
    pages_per_seq = max(needed) + 1  # one spare entry per row: the kernel must never follow it
    num_pages = sum(needed) + extra_pages
    perm = rng.permutation(num_pages)
    page_table = rng.integers(0, num_pages, size=(B, pages_per_seq))  # tail entries: any page at all
    k_pages = np.full((K, num_pages, page_size, H), np.nan, np.float32)
    v_pages = np.full((K, num_pages, page_size, H), np.nan, np.float32)
    q_positions = np.full((B, T), -1, np.int32)
    used = 0
    for b, (start, length, kv_length) in enumerate(chunks):
        page_table[b, : needed[b]] = perm[used : used + needed[b]]
        used += needed[b]
        for s in range(kv_length):
            page, slot = page_table[b, s // page_size], s % page_size
            k_pages[:, page, slot] = rng.standard_normal((K, H))
            v_pages[:, page, slot] = rng.standard_normal((K, H))
        q_positions[b, :length] = np.arange(start, start + length)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    kv_lengths = np.array([c[2] for c in chunks], np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
            jnp.asarray(page_table, jnp.int32), jnp.asarray(q_positions), jnp.asarray(kv_lengths))


def assert_matches_reference(out, args, sliding_window, tol_by_dtype) -> None:
    """out: an attention of args [(q, k_pages, v_pages, page_table, q_positions, kv_lengths)] -> the reference's
    values within tol_by_dtype[q's dtype], finite, and exact zeros on padded (-1) query rows."""
    q, q_positions = args[0], args[4]
    ref = attention_reference(*args, sliding_window=sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    tol = tol_by_dtype[jnp.dtype(q.dtype).name]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    assert (out[np.asarray(q_positions) < 0] == 0).all()  # padded rows are exact zeros


def check(args, *, sliding_window=None, interpret=True, **blocks):
    out = flash_attention(*args, sliding_window=sliding_window, interpret=interpret, **blocks)
    assert_matches_reference(out, args, sliding_window, TOL)


def ragged_prompts(page_size):
    """Whole-prompt prefill of lengths 1, page-1, page, page+1, max in one padded batch."""
    return [(0, n) for n in (1, page_size - 1, page_size, page_size + 1, 2 * page_size + 3)]


# dtype, head_dim, q/kv ratio G, kv heads, page_size, sliding window, blocks: covers each value of each axis.
# SMALL forces several q blocks and several kv blocks per program, so loop bounds and block skipping are exercised.
SMALL = {"block_q": 16, "pages_per_block": 1}
SWEEP = [
    ("float32", 64, 1, 2, 16, None, {}),
    ("float32", 64, 1, 2, 16, 7, SMALL),
    ("float32", 128, 4, 2, 64, None, {}),
    ("float32", 64, 8, 1, 16, 7, {"block_q": 2, "pages_per_block": 2}),
    ("float32", 64, 3, 1, 16, None, {}),  # G not a power of 2 (SmolLM2: 9 heads / 3 kv heads): padded to 4
    ("bfloat16", 64, 4, 2, 16, None, SMALL),
    ("bfloat16", 128, 8, 1, 64, 40, {}),
    ("bfloat16", 128, 1, 2, 16, 16, SMALL),
    ("float16", 64, 1, 1, 64, None, {}),
]


@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks", SWEEP)
def test_prefill_matches_reference(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size))
    check(args, sliding_window=window, **blocks)


def numpy_attention(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window):
    """The attention spec one query row at a time in float64, following the page table by hand."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    page_table, q_positions, kv_lengths = (np.asarray(x) for x in (page_table, q_positions, kv_lengths))
    B, T, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    o = np.zeros_like(q)
    for b, t, n in np.ndindex(B, T, N):
        pos = q_positions[b, t]
        keys = np.array([s for s in range(kv_lengths[b])
                         if s <= pos and (sliding_window is None or pos - s < sliding_window)])
        if not len(keys):
            continue  # a row that sees no key is zeros
        pages, slots = page_table[b, keys // page_size], keys % page_size
        k, v = k_pages[n // (N // K), pages, slots], v_pages[n // (N // K), pages, slots]  # [S, H]
        scores = k @ q[b, t, n] / np.sqrt(H)
        p = np.exp(scores - scores.max())
        o[b, t, n] = p @ v / p.sum()
    return o


@pytest.mark.parametrize("window", [None, 5])
def test_reference_is_the_attention_spec(window):
    """The reference the kernels are held to, against the spec written out in numpy; and it is what the model's
    "reference" attention backend runs."""
    args = make_case(5, dtype="float32", head_dim=64, num_kv_heads=2, group=2, page_size=16,
                     chunks=[(0, 17), (9, 8), (0, 0, 0)])
    ref = np.asarray(attention_reference(*args, sliding_window=window))
    tol = TOLERANCE["reference"]["float32"]
    np.testing.assert_allclose(ref, numpy_attention(*args, window), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(attention(*args, sliding_window=window, backend="reference")), ref)


@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("blocks", [{}, {"block_q": 8, "pages_per_block": 1}], ids=["default", "small"])
def test_chunk_with_cached_prefix(window, blocks):
    """Chunked prefill: queries start at p0 > 0 and see the cached prefix plus the chunk itself."""
    page_size = 16
    chunks = [
        (5, 9),  # starts mid-page
        (page_size - 1, 1),  # one query at the end of a page
        (2 * page_size, page_size + 1),  # starts on a page boundary
        (3, 4, 40),  # keys written past the chunk (causally invisible, still written)
        (2, 20, 12),  # kv_length short of the chunk's end: keys 12.. do not exist even where causal allows them
        (0, 0, 0),  # an empty row: all padding, nothing written
    ]
    args = make_case(1, dtype="float32", head_dim=64, num_kv_heads=2, group=4, page_size=page_size, chunks=chunks)
    check(args, sliding_window=window, **blocks)


def test_padding_rows_anywhere():
    """-1 rows between real queries (a ragged packed batch) give zeros and do not disturb their neighbours."""
    q, k_pages, v_pages, page_table, q_positions, kv_lengths = make_case(
        2, dtype="float32", head_dim=64, num_kv_heads=1, group=2, page_size=16, chunks=[(0, 20), (10, 12)])
    q_positions = q_positions.at[0, 3].set(-1).at[0, 17].set(-1).at[1, 0].set(-1)
    check((q, k_pages, v_pages, page_table, q_positions, kv_lengths), block_q=8, pages_per_block=1)


def test_fully_masked_blocks_are_not_read():
    """Whole kv blocks before the window or past the causal limit hold NaN in written slots: they must be skipped."""
    page_size, window = 16, 8
    # One chunk of queries at 48..63 with keys 0..95 written; visible keys are 41..63 only.
    args = make_case(3, dtype="float32", head_dim=64, num_kv_heads=1, group=1, page_size=page_size,
                     chunks=[(48, 16, 96)])
    q, k_pages, v_pages, page_table, q_positions, kv_lengths = args
    expected = attention_reference(*args, sliding_window=window)
    poisoned = np.concatenate([np.asarray(page_table[0, :2]), np.asarray(page_table[0, 4:6])])  # keys 0..31, 64..95
    k_pages = k_pages.at[:, poisoned].set(jnp.nan)
    v_pages = v_pages.at[:, poisoned].set(jnp.nan)
    out = flash_attention(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=window,
                          block_q=16, pages_per_block=1, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=TOL["float32"], rtol=TOL["float32"])


def _good_args():
    return make_case(4, dtype="float32", head_dim=64, num_kv_heads=2, group=2, page_size=16, chunks=[(0, 3), (0, 5)])


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


@pytest.mark.parametrize("mutate,kwargs,param", [
    (lambda a: _replace(a, 0, a[0][0]), {}, "q.shape"),
    (lambda a: _replace(a, 0, a[0][..., :32]), {}, "head_dim"),
    (lambda a: _replace(a, 0, a[0][:, :, :3]), {}, "N=3"),
    (lambda a: _replace(a, 0, a[0].astype(jnp.int32)), {}, "q.dtype"),
    (lambda a: _replace(a, 1, a[1].astype(jnp.bfloat16)), {}, "k_pages.dtype"),
    (lambda a: _replace(a, 2, a[2][:, :-1]), {}, "v_pages.shape"),
    (lambda a: _replace(a, 3, a[3][:1]), {}, "page_table"),
    (lambda a: _replace(a, 4, a[4][:, :2]), {}, "q_positions"),
    (lambda a: _replace(a, 5, a[5].astype(jnp.float32)), {}, "kv_lengths"),
    (lambda a: a, {"sliding_window": 0}, "sliding_window"),
    (lambda a: a, {"block_q": 12}, "block_q"),
    (lambda a: a, {"pages_per_block": 0}, "pages_per_block"),
])
def test_bad_inputs_raise(mutate, kwargs, param):
    with pytest.raises(ValueError, match=param.replace(".", r"\.")):
        flash_attention(*mutate(_good_args()), interpret=True, **kwargs)


def test_page_size_must_be_power_of_2():
    q, k_pages, v_pages, page_table, q_positions, kv_lengths = _good_args()
    k_pages = jnp.concatenate([k_pages, k_pages[:, :, :8]], axis=2)  # page_size 24
    with pytest.raises(ValueError, match="page_size"):
        flash_attention(q, k_pages, k_pages, page_table, q_positions, kv_lengths, interpret=True)


@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks",
                         [SWEEP[2], SWEEP[3], SWEEP[6], SWEEP[7]])
def test_lowers_to_triton(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    """Pallas' Triton lowering runs on the CPU: a primitive Triton cannot lower, or a tile that is not a power
    of two, fails here in CI. It stops at Triton IR; the passes to PTX run only on the device."""
    pytest.importorskip("jaxlib.triton.dialect")
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size))
    fn = jax.jit(lambda *a: flash_attention(*a, sliding_window=window, **blocks))
    assert "__gpu$xla.gpu.triton" in lower_for_h100(fn, *args)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas (Triton) needs a GPU")
@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks", SWEEP)
def test_compiled_on_gpu(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size) + [(70, 9, 200)])
    check(args, sliding_window=window, interpret=False)  # default (tuned) blocks: the ones production uses
    check(args, sliding_window=window, interpret=False, **blocks)


# --------------------------------------------------------------------------------------- the Mosaic GPU body

needs_mosaic_interpreter = pytest.mark.skipif(
    not interpreter_available(), reason="Mosaic GPU's interpreter runs this body from jax 0.11 on")
# 16-bit only; G 3 (padded to 4), 8 and 1; page 16 and 64; window on and off; two ring sizes.
MOSAIC_SWEEP = [
    ("bfloat16", 64, 4, 2, 16, None, {}),
    ("bfloat16", 64, 3, 1, 16, 7, {"pages_per_block": 8, "num_stages": 3}),
    ("bfloat16", 128, 8, 1, 64, 40, {}),
    ("bfloat16", 128, 1, 2, 16, 16, {}),
    ("float16", 64, 1, 1, 64, None, {"pages_per_block": 2}),
]


@needs_mosaic_interpreter
@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks", MOSAIC_SWEEP)
def test_mosaic_prefill_matches_reference(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    # 2 * page + 3 = 35 (page 16) query positions x G rows: several 64-row programs per sequence.
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size))
    check(args, sliding_window=window, implementation="mosaic", **blocks)


@needs_mosaic_interpreter
@pytest.mark.parametrize("window", [None, 11])
def test_mosaic_chunk_with_cached_prefix_and_padding(window):
    """Chunks past a cached prefix, kv_length short of a chunk, an empty row, -1 rows between real ones."""
    chunks = [(5, 9), (15, 1), (32, 17), (3, 4, 40), (2, 20, 12), (0, 0, 0)]
    q, k_pages, v_pages, page_table, q_positions, kv_lengths = make_case(
        1, dtype="bfloat16", head_dim=64, num_kv_heads=2, group=4, page_size=16, chunks=chunks)
    q_positions = q_positions.at[0, 3].set(-1).at[2, 0].set(-1)
    check((q, k_pages, v_pages, page_table, q_positions, kv_lengths), sliding_window=window,
          implementation="mosaic")


@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks",
                         [MOSAIC_SWEEP[1], MOSAIC_SWEEP[2]])
def test_mosaic_lowers_for_cuda(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    """Pallas' Mosaic GPU lowering (layouts, TMA descriptors, wgmma shapes) runs on the CPU for CUDA."""
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size))
    fn = jax.jit(lambda *a: flash_attention(*a, sliding_window=window, implementation="mosaic", **blocks))
    hlo = lower_for_h100(fn, *args)
    assert "mosaic_gpu" in hlo and "triton" not in hlo


@pytest.mark.parametrize("kwargs,param", [
    (dict(dtype="float32"), "float32"),
    (dict(block_q=16), "block_q=16"),
    (dict(pages_per_block=1), "pages_per_block=1"),
    (dict(pages_per_block=64, num_stages=4), "shared memory"),
    (dict(implementation="cuda"), "implementation='cuda'"),
])
def test_mosaic_bad_inputs_raise(kwargs, param):
    kwargs = {"implementation": "mosaic", **kwargs}
    dtype = kwargs.pop("dtype", "bfloat16")
    args = make_case(0, dtype=dtype, head_dim=64, num_kv_heads=1, group=2, page_size=16, chunks=[(0, 5)])
    with pytest.raises(ValueError, match=param.replace("(", r"\(")):
        flash_attention(*args, **kwargs)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Mosaic GPU needs a Hopper GPU")
@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads,page_size,window,blocks", MOSAIC_SWEEP)
def test_mosaic_compiled_on_gpu(dtype, head_dim, group, num_kv_heads, page_size, window, blocks):
    args = make_case(0, dtype=dtype, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
                     page_size=page_size, chunks=ragged_prompts(page_size) + [(70, 9, 200)])
    check(args, sliding_window=window, interpret=False, implementation="mosaic")
    check(args, sliding_window=window, interpret=False, implementation="mosaic", **blocks)
