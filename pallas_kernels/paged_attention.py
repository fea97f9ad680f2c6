"""Paged decode attention: one query token per sequence attends to its pages of the KV cache.

Two bodies behind one wrapper (`implementation=`):
- "mosaic": a Mosaic GPU (`plgpu.kernel`) body for Hopper, in `paged_attention_mgpu.py` (TMA page copies
  into a ring of shared-memory slots, wgmma for both products). It takes 16-bit inputs with head_dim a
  multiple of 64 and page_size a multiple of 8; the default on the GPU for such inputs.
- "triton": a generic `pl.pallas_call` body, below: every dtype and shape, lowered through Triton on the
  GPU (Triton compiler params pick that lowering; jax 0.11 deprecates it but still runs it) and through
  the HLO interpreter on the CPU (`interpret=True`, any jax).
`interpret=True` runs the chosen body on the CPU: "triton" through the HLO interpreter, "mosaic" through
Mosaic GPU's own interpreter (jax >= 0.11; 0.10's interpreter lacks `layout_cast`). The CPU tests also
lower both bodies for CUDA (`lowering_platforms=("cuda",)`), which needs no GPU; the passes to PTX, and
the speed, are checked only on the device.

Algorithm (flash-decoding over pages):
- Grid (B, K, num_splits). Program (b, k, s) takes the G = N // K query heads that share kv head k as one
  [G, H] block, so every kv page is read once for all G heads. G is zero-padded to a power of two >= 16
  in the wrapper because Triton's dot wants M >= 16 rows and every Triton tensor a power-of-two size.
- Sequence b's page-table row is cut into blocks of `pages_per_block` pages (block_k = pages_per_block *
  page_size keys) and the blocks into `num_splits` contiguous ranges. Each program loops only over the
  blocks of its range that hold visible keys (the loop bounds come from kv_length, q_position and the
  sliding window), reads the page indices from the page table inside the kernel, gathers those pages of
  head k, and keeps an online softmax (m_i, l_i, o) in float32, in log2 units so the GPU uses exp2.
- Keys inside a block that are not visible (past the length, after the query, outside the window) are
  masked in the scores and their V rows zeroed: unwritten slots may hold anything, NaN included.
- Each program writes its unnormalised partial (o, m_i, l_i); a jnp log-sum-exp step merges the splits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import mosaic_common, paged_attention_mgpu

_MASKED = -1e30  # finite: exp2(_MASKED - m) is exactly 0 and m never becomes -inf, so no inf - inf = NaN
_LOG2E = math.log2(math.e)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MIN_DOT_ROWS = 16  # Triton's dot needs M >= 16

# (dtype, head_dim, page_size) -> (pages_per_block, num_warps, num_stages). GUESSES, not measured yet:
# block_k = pages_per_block * page_size aims at 128 keys per step for 16-bit inputs (64 for float32, to
# keep the [block_k, H] K and V tiles in registers). Replace with measurements from the H100.
_TUNED = {
    ("bfloat16", 64, 16): (8, 4, 2),
    ("bfloat16", 64, 64): (2, 4, 2),
    ("bfloat16", 128, 16): (8, 4, 2),
    ("bfloat16", 128, 64): (2, 4, 2),
    ("float16", 64, 16): (8, 4, 2),
    ("float16", 64, 64): (2, 4, 2),
    ("float16", 128, 16): (8, 4, 2),
    ("float16", 128, 64): (2, 4, 2),
    ("float32", 64, 16): (4, 4, 2),
    ("float32", 64, 64): (1, 4, 2),
    ("float32", 128, 16): (4, 4, 2),
    ("float32", 128, 64): (1, 4, 2),
}
# Enough programs to fill an H100's 132 SMs about twice over; also a guess until measured.
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16


def _next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _paged_attention_kernel(
    # inputs
    q_ref,  # [Gp, H]: the (padded) query heads of one kv head
    k_pages_ref,  # [P, page_size, H]: kv head k's whole pool
    v_pages_ref,  # [P, page_size, H]
    page_table_ref,  # [num_blocks * pages_per_block]: sequence b's row, padded, entries clipped into [0, P)
    kv_length_ref,  # []
    q_position_ref,  # []
    # outputs
    o_ref,  # [Gp, H] float32, unnormalised
    m_ref,  # [Gp] float32, running max of the scores in log2 units
    l_ref,  # [Gp] float32, running sum of exp2(score - m)
    *,
    scale_log2: float,
    pages_per_block: int,
    blocks_per_split: int,
    max_keys: int,
    sliding_window: int | None,
    precision,
):
    split = pl.program_id(2)
    num_rows, head_dim = q_ref.shape
    page_size = k_pages_ref.shape[1]
    block_k = pages_per_block * page_size

    # Visible keys are [lo, hi): written, not after the query, inside the window.
    q_position = q_position_ref[()]
    hi = jnp.clip(jnp.minimum(kv_length_ref[()], q_position + 1), 0, max_keys)
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(q_position - sliding_window + 1, 0)
    first_block = jnp.maximum(split * blocks_per_split, lo // block_k)
    end_block = jnp.minimum((split + 1) * blocks_per_split, pl.cdiv(hi, block_k))

    q = q_ref[...]  # [Gp, H]

    def body(i, carry):
        o, m_i, l_i = carry
        block = first_block + i
        pages = page_table_ref[pl.ds(block * pages_per_block, pages_per_block)]  # [pages_per_block]
        k = k_pages_ref[pages].reshape(block_k, head_dim)  # [pages_per_block, page_size, H] -> [block_k, H]
        v = v_pages_ref[pages].reshape(block_k, head_dim)  # [block_k, H]
        position = block * block_k + jnp.arange(block_k)  # [block_k]
        visible = (position >= lo) & (position < hi)  # [block_k]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [Gp, block_k]
        s = jnp.where(visible[None, :], s * scale_log2, _MASKED)
        m_next = jnp.maximum(m_i, s.max(axis=1))  # [Gp]
        alpha = jnp.exp2(m_i - m_next)  # [Gp]
        p = jnp.exp2(s - m_next[:, None])  # [Gp, block_k], exactly 0 where masked
        l_next = alpha * l_i + p.sum(axis=1)
        # p is 0 there, but 0 * NaN is NaN: unwritten V slots must not reach the dot.
        v = jnp.where(visible[:, None], v, jnp.zeros((), v.dtype))
        pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)  # [Gp, H]
        return alpha[:, None] * o + pv, m_next, l_next

    o = jnp.zeros((num_rows, head_dim), jnp.float32)
    m_i = jnp.full((num_rows,), _MASKED, jnp.float32)
    l_i = jnp.zeros((num_rows,), jnp.float32)
    num_iters = jnp.maximum(end_block - first_block, 0)
    o, m_i, l_i = lax.fori_loop(0, num_iters, body, (o, m_i, l_i))
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


def default_block_sizes(dtype, head_dim: int, page_size: int) -> tuple[int, int, int]:
    """(pages_per_block, num_warps, num_stages) from the tuned table, or a rule of thumb off the table."""
    key = (jnp.dtype(dtype).name, head_dim, page_size)
    if key in _TUNED:
        return _TUNED[key]
    target_keys = 64 if jnp.dtype(dtype).itemsize == 4 else 128
    return max(1, target_keys // page_size), 4, 2


def _check_int(name: str, value, *, power_of_2: bool = False):
    if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive int")
    if power_of_2 and not _is_power_of_2(value):
        raise ValueError(f"{name}={value!r} must be a power of 2")


def _validate(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window):
    if q.ndim != 3:
        raise ValueError(f"q.shape={q.shape} must be [B, N, H]")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages.shape={k_pages.shape} must be [K, P, page_size, H]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages.shape={v_pages.shape} must equal k_pages.shape={k_pages.shape}")
    B, N, H = q.shape
    K, _, _, head_dim = k_pages.shape
    if H != head_dim:
        raise ValueError(f"q head_dim={H} must equal k_pages head_dim={head_dim}")
    if head_dim % 16:
        raise ValueError(f"{head_dim=} must be a multiple of 16")
    if N % K:
        raise ValueError(f"num_heads={N} must be a multiple of num_kv_heads={K}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q.dtype={q.dtype} must be one of {[d.name for d in _DTYPES]}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={x.dtype} must equal q.dtype={q.dtype}")
    if page_table.ndim != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table.shape={page_table.shape} must be [B={B}, pages_per_seq]")
    for name, x, shape in (("page_table", page_table, page_table.shape), ("q_positions", q_positions, (B,)),
                           ("kv_lengths", kv_lengths, (B,))):
        if x.shape != shape:
            raise ValueError(f"{name}.shape={x.shape} must be {shape}")
        if x.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={x.dtype} must be int32")
    if sliding_window is not None:
        _check_int("sliding_window", sliding_window)


@functools.partial(
    jax.jit, static_argnames=("sliding_window", "pages_per_block", "num_splits", "num_warps", "num_stages",
                              "implementation", "interpret"))
def paged_attention(
    q: jax.Array,  # [B, N, H]
    k_pages: jax.Array,  # [K, P, page_size, H]
    v_pages: jax.Array,  # [K, P, page_size, H]
    page_table: jax.Array,  # [B, pages_per_seq] int32
    q_positions: jax.Array,  # [B] int32, -1 = padding
    kv_lengths: jax.Array,  # [B] int32
    *,
    sliding_window: int | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention of q [B, N, H] over the paged cache -> [B, N, H] in q.dtype.

    Sequence b's keys 0..kv_lengths[b]-1 live in pages page_table[b]; its query sits at q_positions[b]
    (usually kv_lengths[b] - 1) and sees keys s <= q_position with q_position - s < sliding_window.
    A row that sees no key (length 0, position -1) returns zeros. The arguments are flash_attention's, in its
    order, with T = 1; the contract is `pallas_kernels.reference.paged_attention_reference`.

    pages_per_block: pages per inner step; num_splits: how many programs share one sequence
    (flash-decoding); num_stages: software-pipeline depth (Triton stages, or Mosaic GPU ring slots);
    num_warps: Triton only. None picks them from the tuned tables and the grid size.
    implementation: "mosaic" (Hopper, 16-bit inputs) or "triton" (generic); None picks "mosaic" on a GPU
    when the inputs allow it, else "triton".
    """
    _validate(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window)
    B, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    G = N // K
    implementation = mosaic_common.pick_implementation(implementation, interpret, q.dtype, H, page_size, G)
    if implementation == "mosaic":
        return _paged_attention_mosaic(q, k_pages, v_pages, page_table, q_positions, kv_lengths,
                                       sliding_window=sliding_window, pages_per_block=pages_per_block,
                                       num_splits=num_splits, num_stages=num_stages, interpret=interpret)
    tuned_pages, tuned_warps, tuned_stages = default_block_sizes(q.dtype, H, page_size)
    pages_per_block = tuned_pages if pages_per_block is None else pages_per_block
    num_warps = tuned_warps if num_warps is None else num_warps
    num_stages = tuned_stages if num_stages is None else num_stages
    _check_int("pages_per_block", pages_per_block, power_of_2=True)
    _check_int("num_warps", num_warps, power_of_2=True)
    _check_int("num_stages", num_stages)
    if not interpret:
        # Triton tensors must have power-of-two sizes: the [block_k, H] tiles and the key iota.
        _check_int("page_size", page_size, power_of_2=True)
        _check_int("head_dim", H, power_of_2=True)
    pages_per_block = min(pages_per_block, _next_power_of_2(pages_per_seq))
    num_splits, blocks_per_split, page_table = _plan_splits(page_table, P, B * K, pages_per_block, num_splits)
    rows = max(_MIN_DOT_ROWS, _next_power_of_2(G))
    q = q.reshape(B, K, G, H)  # [B, K, G, H]
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - G), (0, 0)))  # [B, K, Gp, H], zero rows are sliced off below

    kernel = functools.partial(
        _paged_attention_kernel,
        scale_log2=H**-0.5 * _LOG2E,
        pages_per_block=pages_per_block,
        blocks_per_split=blocks_per_split,
        max_keys=pages_per_seq * page_size,
        sliding_window=sliding_window,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,  # no TF32 for float32 inputs
    )
    pool_spec = pl.BlockSpec((None, P, page_size, H), lambda b, k, s: (k, 0, 0, 0))
    scalar_spec = pl.BlockSpec((None,), lambda b, k, s: (b,))
    stats_spec = pl.BlockSpec((None, None, None, rows), lambda b, k, s: (s, b, k, 0))
    with jax.named_scope("paged_attention"):
        o, m, l = pl.pallas_call(
            kernel,
            grid=(B, K, num_splits),
            in_specs=[
                pl.BlockSpec((None, None, rows, H), lambda b, k, s: (b, k, 0, 0)),  # q
                pool_spec,  # k_pages
                pool_spec,  # v_pages
                pl.BlockSpec((None, page_table.shape[1]), lambda b, k, s: (b, 0)),  # page_table
                scalar_spec,  # kv_lengths
                scalar_spec,  # q_positions
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, rows, H), lambda b, k, s: (s, b, k, 0, 0)),  # o
                stats_spec,  # m
                stats_spec,  # l
            ],
            out_shape=[
                jax.ShapeDtypeStruct((num_splits, B, K, rows, H), jnp.float32),
                jax.ShapeDtypeStruct((num_splits, B, K, rows), jnp.float32),
                jax.ShapeDtypeStruct((num_splits, B, K, rows), jnp.float32),
            ],
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="paged_attention",
        )(q, k_pages, v_pages, page_table, kv_lengths, q_positions)

        return _merge_splits(o, m, l, G).reshape(B, N, H).astype(q.dtype)  # [B, K, G, H] -> [B, N, H]


def _plan_splits(page_table, num_pages: int, programs_per_split: int, pages_per_block: int, num_splits):
    """-> (num_splits, blocks_per_split, page table padded to num_splits * blocks_per_split blocks).

    num_splits None fills the GPU (about _TARGET_PROGRAMS programs); splits that would get no block are
    dropped. Entries past a sequence's pages may be anything: they are clipped into [0, num_pages) so a
    kernel never reads outside the pool (what they point at is masked).
    """
    pages_per_seq = page_table.shape[1]
    num_blocks = pl.cdiv(pages_per_seq, pages_per_block)
    if num_splits is None:
        num_splits = min(pl.cdiv(_TARGET_PROGRAMS, programs_per_split), num_blocks, _MAX_SPLITS)
    _check_int("num_splits", num_splits)
    blocks_per_split = pl.cdiv(num_blocks, min(num_splits, num_blocks))
    num_splits = pl.cdiv(num_blocks, blocks_per_split)
    padded_pages = num_splits * blocks_per_split * pages_per_block
    page_table = jnp.pad(jnp.clip(page_table, 0, num_pages - 1), ((0, 0), (0, padded_pages - pages_per_seq)))
    return num_splits, blocks_per_split, page_table


def _merge_splits(o, m, l, group: int) -> jax.Array:
    """Partials o [S, B, K, Gp, H], m and l [S, B, K, Gp] (log2 units) -> [B, K, G, H] float32.

    Each split is rescaled to the common max; a split that saw no key has l = 0, a row no split saw is 0.
    """
    m_max = m.max(axis=0)  # [B, K, Gp]
    w = jnp.exp2(m - m_max)  # [S, B, K, Gp]
    l = (l * w).sum(axis=0)  # [B, K, Gp]
    o = (o * w[..., None]).sum(axis=0)  # [B, K, Gp, H]
    o = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return o[:, :, :group]


def _paged_attention_mosaic(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window,
                            pages_per_block, num_splits, num_stages, interpret):
    """The Mosaic GPU body (`paged_attention_mgpu`) behind `paged_attention`'s contract."""
    B, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    G = N // K
    pages_per_block, num_stages = mosaic_common.ring_blocks(
        page_size, pages_per_block, num_stages,
        smem_bytes=functools.partial(paged_attention_mgpu.shared_memory_bytes, q.dtype, H))
    num_splits, blocks_per_split, page_table = _plan_splits(page_table, P, B * K, pages_per_block, num_splits)
    # Visible keys are [lo, hi): written, not after the query, inside the window.
    hi = jnp.clip(jnp.minimum(kv_lengths, q_positions + 1), 0, pages_per_seq * page_size)  # [B]
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(q_positions - sliding_window + 1, 0)
    with jax.named_scope("paged_attention"):
        o, m, l = paged_attention_mgpu.paged_attention_partials(
            q.reshape(B, K, G, H), k_pages, v_pages, page_table, lo, hi, pages_per_block=pages_per_block,
            blocks_per_split=blocks_per_split, num_splits=num_splits, num_stages=num_stages,
            interpret=interpret)
        return _merge_splits(o, m, l, G).reshape(B, N, H).astype(q.dtype)
