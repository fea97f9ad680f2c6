"""Flash attention for prefill and chunked prefill, reading K/V straight from the paged cache.

Two bodies behind one wrapper (`implementation=`), as for paged decode:
- "mosaic": a Mosaic GPU (`plgpu.kernel`) body for Hopper in `flash_attention_mgpu.py`: 64 query rows per
  warpgroup, TMA page ring, wgmma. 16-bit inputs, head_dim a multiple of 64, page_size a multiple of 8;
  the default on a GPU for such inputs. Not warp-specialised yet (FlashAttention-3's producer warpgroup
  and two consumer warpgroups are the next step once it has been measured).
- "triton": the generic `pl.pallas_call` body below, every supported dtype; with `interpret=True` it runs
  on the CPU through the HLO interpreter (any jax); compiled on GPU it lowers through Pallas Triton
  (jax 0.11: deprecated, still works).

Algorithm (FlashAttention-2 forward, online softmax in float32):
- q [B, T, N, H] is regrouped so that one program owns block_q query positions of all G = N // K query
  heads that share one kv head: a q tile of [block_q * G, H] rows (row = t * G + g; G is padded to a power
  of 2 with dummy heads, as Triton tiles must be). GQA/MQA therefore reads each K/V page once per program
  instead of once per query head, and K/V are never copied per head.
- Grid (B, T / block_q, K). Each program walks kv blocks of `pages_per_block` pages (block_k =
  pages_per_block * page_size keys), reading page indices from the sequence's page-table row inside the
  kernel and gathering those pages out of the whole per-head pool [P, page_size, H].
- Positions are runtime data, so the kv loop bounds are computed in the kernel: from the block's first
  visible key (the sliding window of its earliest query) to its last (causal limit of its latest query,
  capped at kv_length). Blocks entirely outside that range are never loaded.
- Inside a block: key s is visible to a query at position p iff s < kv_length, s <= p and (with a window)
  p - s < window. Scores are masked with a finite value and probabilities are zeroed explicitly, so rows
  that see no key (padding, position -1) end with l = 0 and are written as zeros, never NaN. V rows at or
  past kv_length are zeroed before the PV matmul, so NaN/garbage in unwritten slots never reaches o.
- Softmax uses exp2 with log2(e) folded into the 1/sqrt(H) score scale (as JAX's Triton attention does).
- Matmuls take the input dtype and accumulate in float32; in interpret mode their bf16/f16 operands are
  upcast to float32 first (exact: XLA:CPU cannot execute a bf16 x bf16 -> f32 dot there).

Chunked prefill: the model writes a chunk's K/V into the cache before attention, so a chunk whose queries
start at p0 > 0 attends to the cached prefix and to itself through the same page walk.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import flash_attention_mgpu, mosaic_common

_MASKED = -1e30  # finite: masked - masked stays 0 instead of NaN
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_HEAD_DIMS = (64, 128)
_MIN_DOT_DIM = 16  # Triton's tl.dot wants every matmul dim >= 16


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Default tile sizes. block_rows = block_q * G (query rows per program); block_k = pages_per_block * page_size."""

    block_rows: int
    pages_per_block: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "pages_per_block", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not _is_power_of_2(self.block_rows) or not _is_power_of_2(self.pages_per_block):
            raise ValueError(f"{self.block_rows=} and {self.pages_per_block=} must be powers of 2")


# (dtype, head_dim, page_size) -> FlashBlocks. GUESSES for an H100 under Triton, not measured yet: ~128 query
# rows and 64-128 keys per kv step, as JAX's Triton attention uses (block_q = block_k = 128, 4 warps for
# H <= 64, else 8), halved for float32 whose tiles take twice the registers. Replace with benchmark results.
_b, _f = "bfloat16", "float16"
TUNED: dict[tuple[str, int, int], FlashBlocks] = {
    (_b, 64, 16): FlashBlocks(128, 8, num_warps=4),  # block_k 128
    (_b, 64, 64): FlashBlocks(128, 2, num_warps=4),
    (_b, 128, 16): FlashBlocks(128, 4, num_warps=8),  # block_k 64
    (_b, 128, 64): FlashBlocks(128, 1, num_warps=8),
    (_f, 64, 16): FlashBlocks(128, 8, num_warps=4),
    (_f, 64, 64): FlashBlocks(128, 2, num_warps=4),
    (_f, 128, 16): FlashBlocks(128, 4, num_warps=8),
    (_f, 128, 64): FlashBlocks(128, 1, num_warps=8),
    ("float32", 64, 16): FlashBlocks(64, 4, num_warps=4),  # block_k 64
    ("float32", 64, 64): FlashBlocks(64, 1, num_warps=4),
    ("float32", 128, 16): FlashBlocks(64, 2, num_warps=8),  # block_k 32
    ("float32", 128, 64): FlashBlocks(64, 1, num_warps=8),
}
_FALLBACK = FlashBlocks(64, 1)  # other page sizes: pages_per_block is raised to reach block_k >= 16


def _flash_attention_kernel(
    # inputs
    kv_lengths_ref,  # [1] int32: this sequence's kv_length
    q_positions_ref,  # [R] int32, R = block_q * G: absolute position of each q row, -1 = padding
    page_table_ref,  # [pages_per_seq_padded] int32: this sequence's page-table row
    q_ref,  # [R, H]
    k_pages_ref,  # [P, page_size, H]: the whole page pool of this kv head
    v_pages_ref,  # [P, page_size, H]
    # outputs
    o_ref,  # [R, H]
    *,
    qk_scale: float,  # H**-0.5 * log2(e)
    pages_per_block: int,
    max_kv_length: int,  # pages_per_seq * page_size: keys beyond the page table do not exist
    sliding_window: int | None,
    upcast_dots: bool,  # interpret mode: XLA:CPU cannot run bf16 x bf16 -> f32 dots inside the interpreted body
):
    R, H = q_ref.shape
    num_pages, page_size, _ = k_pages_ref.shape
    block_k = pages_per_block * page_size

    kv_length = jnp.clip(kv_lengths_ref[0], 0, max_kv_length)
    pos = q_positions_ref[...]  # [R]
    is_query = pos >= 0
    last_pos = jnp.max(jnp.where(is_query, pos, -1))
    # kv blocks [kv_block_lo, kv_block_hi) hold every key some row of this block can see; none if all rows are padding.
    key_hi = jnp.minimum(last_pos + 1, kv_length)
    kv_block_hi = lax.div(key_hi + (block_k - 1), block_k)
    if sliding_window is None:
        kv_block_lo = 0
    else:
        first_pos = jnp.min(jnp.where(is_query, pos, max_kv_length))
        kv_block_lo = lax.div(jnp.maximum(first_pos - (sliding_window - 1), 0), block_k)

    q = q_ref[...]  # [R, H], input dtype: the MMA runs in it and accumulates in float32
    # Upcasting bf16/f16 operands is exact (their products fit in float32), so this changes no result.
    mm_dtype = jnp.float32 if upcast_dots else q.dtype
    q = q.astype(mm_dtype)

    def body(j, carry):
        o_prev, m_prev, l_prev = carry  # [R, H], [R], [R] float32
        pages = page_table_ref[pl.ds(j * pages_per_block, pages_per_block)]  # [pages_per_block]
        # Keep the gather in bounds whatever the table holds past the sequence (those keys are masked anyway).
        pages = jnp.clip(pages, 0, num_pages - 1)
        k = k_pages_ref[pages].reshape(block_k, H)  # [pages_per_block, page_size, H] -> [block_k, H]
        v = v_pages_ref[pages].reshape(block_k, H)  # [block_k, H]
        key = j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [block_k] absolute key positions
        written = key < kv_length
        # Unwritten slots may hold NaN and 0 * NaN = NaN in the PV matmul: zero them.
        v = jnp.where(written[:, None], v, jnp.zeros((), v.dtype))
        qk = lax.dot_general(q, k.astype(mm_dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = qk * qk_scale  # [R, block_k], log2 domain
        visible = written[None, :] & (key[None, :] <= pos[:, None])  # [R, block_k]
        if sliding_window is not None:
            visible &= pos[:, None] - key[None, :] < sliding_window
        s = jnp.where(visible, s, _MASKED)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))  # [R]
        correction = jnp.exp2(m_prev - m_next)  # [R]
        # Zeroed, not just tiny: a row that has seen no key yet has m = _MASKED and exp2(0) = 1 would count.
        p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)  # [R, block_k]
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        # p is rounded to the cache dtype as the reference rounds its probabilities, then multiplied exactly.
        pv = jnp.dot(p.astype(v.dtype).astype(mm_dtype), v.astype(mm_dtype), preferred_element_type=jnp.float32)
        return correction[:, None] * o_prev + pv, m_next, l_next

    o = jnp.zeros((R, H), jnp.float32)
    m_i = jnp.full((R,), _MASKED, jnp.float32)
    l_i = jnp.zeros((R,), jnp.float32)
    o, m_i, l_i = lax.fori_loop(kv_block_lo, kv_block_hi, body, (o, m_i, l_i))
    # l = 0 exactly when the row saw no key (padding): write zeros, as the reference does.
    seen = l_i > 0
    o = jnp.where(seen[:, None], o / jnp.where(seen, l_i, 1.0)[:, None], 0.0)
    o_ref[...] = o.astype(o_ref.dtype)


def _check_inputs(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window):
    if q.ndim != 4:
        raise ValueError(f"q.shape={q.shape} must be [B, T, N, H]")
    B, T, N, H = q.shape
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages.shape={k_pages.shape} must be [K, P, page_size, H]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages.shape={v_pages.shape} must equal k_pages.shape={k_pages.shape}")
    K, _, page_size, Hk = k_pages.shape
    if Hk != H:
        raise ValueError(f"k_pages head_dim={Hk} must equal q head_dim={H}")
    if H not in _HEAD_DIMS:
        raise ValueError(f"head_dim={H} must be one of {_HEAD_DIMS}")
    if K == 0 or N % K:
        raise ValueError(f"q heads N={N} must be a multiple of k_pages kv heads K={K}")
    if not _is_power_of_2(page_size):
        raise ValueError(f"{page_size=} must be a power of 2")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q.dtype={q.dtype} must be one of {[str(d) for d in _DTYPES]}")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"k_pages.dtype={k_pages.dtype} and v_pages.dtype={v_pages.dtype} must equal {q.dtype=}")
    if page_table.ndim != 2 or page_table.shape[0] != B or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"page_table {page_table.shape} {page_table.dtype} must be integer [B={B}, pages_per_seq]")
    if q_positions.shape != (B, T) or not jnp.issubdtype(q_positions.dtype, jnp.integer):
        raise ValueError(f"q_positions {q_positions.shape} {q_positions.dtype} must be integer [B, T]={(B, T)}")
    if kv_lengths.shape != (B,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise ValueError(f"kv_lengths {kv_lengths.shape} {kv_lengths.dtype} must be integer [B]={(B,)}")
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window > 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be None or a positive int")


def default_blocks(dtype, head_dim: int, page_size: int) -> FlashBlocks:
    return TUNED.get((jnp.dtype(dtype).name, head_dim, page_size), _FALLBACK)


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "block_q", "pages_per_block", "num_stages", "implementation", "interpret"),
)
def flash_attention(
    q,  # [B, T, N, H]
    k_pages,  # [K, P, page_size, H]
    v_pages,  # [K, P, page_size, H]
    page_table,  # [B, pages_per_seq] int
    q_positions,  # [B, T] int, -1 = padding
    kv_lengths,  # [B] int
    *,
    sliding_window: int | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_stages: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
):
    """Causal (optionally sliding-window) attention of q over the paged cache -> [B, T, N, H] in q.dtype.

    Same contract as `pallas_kernels.reference.attention_reference`. implementation: "mosaic" (Hopper, 16-bit)
    or "triton" (generic); None picks "mosaic" on a GPU when the inputs allow it. For "triton", block_q
    (query positions per program) and pages_per_block (pages per kv step) default from TUNED and must be
    powers of 2; "mosaic" takes 64 query rows per program, pages_per_block * page_size a multiple of 64
    keys and num_stages ring slots.
    """
    _check_inputs(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window)
    B, T, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    G = N // K
    if mosaic_common.pick_implementation(implementation, interpret, q.dtype, H, page_size, G) == "mosaic":
        if block_q is not None:
            raise ValueError(f"block_q={block_q!r} is for implementation='triton'; 'mosaic' takes 64 query rows")
        return _flash_attention_mosaic(q, k_pages, v_pages, page_table, q_positions, kv_lengths,
                                       sliding_window=sliding_window, pages_per_block=pages_per_block,
                                       num_stages=num_stages, interpret=interpret)
    G_pad = pl.next_power_of_2(G)  # Triton tiles are powers of 2: pad e.g. G = 3 to 4 with dummy heads
    blocks = default_blocks(q.dtype, H, page_size)

    if block_q is None:
        block_q = max(1, blocks.block_rows // G_pad)
        block_q = min(block_q, pl.next_power_of_2(T))  # short chunks: don't pad T up to a big tile
        block_q = max(block_q, -(-_MIN_DOT_DIM // G_pad))
    if pages_per_block is None:
        pages_per_block = min(blocks.pages_per_block, pl.next_power_of_2(pages_per_seq))
        pages_per_block = max(pages_per_block, -(-_MIN_DOT_DIM // page_size))
    for name, value in (("block_q", block_q), ("pages_per_block", pages_per_block)):
        if not (isinstance(value, int) and _is_power_of_2(value)):
            raise ValueError(f"{name}={value!r} must be a positive power of 2")

    R = block_q * G_pad  # q rows per program
    pages_per_seq_pad = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block

    qg, positions = _rows_by_kv_head(q, q_positions, K, G_pad, block_q)  # [B, K, T_pad * G_pad, H], [B, T_pad * G_pad]
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, pages_per_seq_pad - pages_per_seq)))  # [B, pps_pad]

    kernel = functools.partial(
        _flash_attention_kernel,
        qk_scale=H**-0.5 * math.log2(math.e),
        pages_per_block=pages_per_block,
        max_kv_length=pages_per_seq * page_size,
        sliding_window=sliding_window,
        upcast_dots=interpret,
    )
    # Triton's params pick the Triton lowering explicitly: without them jax 0.10 lowers a GPU pallas_call
    # through Mosaic GPU, which cannot take this body (its whole-pool blocks overflow shared memory).
    compiler_params = None if interpret else pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                                     num_stages=blocks.num_stages)
    P = k_pages.shape[1]
    o = pl.pallas_call(
        kernel,
        grid=(B, qg.shape[2] // R, K),
        in_specs=[
            pl.BlockSpec((1,), lambda b, i, h: (b,)),  # kv_lengths
            pl.BlockSpec((None, R), lambda b, i, h: (b, i)),  # positions
            pl.BlockSpec((None, pages_per_seq_pad), lambda b, i, h: (b, 0)),  # page table row
            pl.BlockSpec((None, None, R, H), lambda b, i, h: (b, h, i, 0)),  # q
            pl.BlockSpec((None, P, page_size, H), lambda b, i, h: (h, 0, 0, 0)),  # k_pages
            pl.BlockSpec((None, P, page_size, H), lambda b, i, h: (h, 0, 0, 0)),  # v_pages
        ],
        out_specs=pl.BlockSpec((None, None, R, H), lambda b, i, h: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name="flash_attention",
    )(kv_lengths.astype(jnp.int32), positions, table, qg, k_pages, v_pages)
    return _heads_from_rows(o, T, G)  # [B, T, N, H]


def _rows_by_kv_head(q, q_positions, num_kv_heads: int, G_pad: int, block_q: int):
    """q [B, T, N, H] -> (rows [B, K, T_pad * G_pad, H], row positions [B, T_pad * G_pad] int32).

    Row t * G_pad + g is query position t of head g of kv head k: a program's block of block_q positions is
    block_q * G_pad consecutive rows. T is padded to whole blocks (positions -1) and G to G_pad (zero heads).
    """
    B, T, N, H = q.shape
    G = N // num_kv_heads
    T_pad = pl.cdiv(T, block_q) * block_q
    qg = q.reshape(B, T, num_kv_heads, G, H)  # [B, T, K, G, H]
    qg = jnp.pad(qg, ((0, 0), (0, T_pad - T), (0, 0), (0, G_pad - G), (0, 0)))  # [B, T_pad, K, G_pad, H]
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(B, num_kv_heads, T_pad * G_pad, H)  # [B, K, T_pad * G_pad, H]
    positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, T_pad - T)), constant_values=-1)  # [B, T_pad]
    return qg, jnp.repeat(positions, G_pad, axis=1)  # [B, T_pad * G_pad]


def _heads_from_rows(o, T: int, G: int):
    """The inverse of `_rows_by_kv_head` on the output: [B, K, T_pad * G_pad, H] -> [B, T, K * G, H]."""
    B, K, R, H = o.shape
    G_pad = pl.next_power_of_2(G)
    o = o.reshape(B, K, R // G_pad, G_pad, H)[:, :, :T, :G]  # [B, K, T, G, H]
    return o.transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, H)


def _flash_attention_mosaic(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window,
                            pages_per_block, num_stages, interpret):
    """The Mosaic GPU body (`flash_attention_mgpu`) behind `flash_attention`'s contract."""
    B, T, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    G = N // K
    G_pad = pl.next_power_of_2(G)  # a power of two divides the 64-row tile: no row straddles two programs
    pages_per_block, num_stages = mosaic_common.ring_blocks(
        page_size, pages_per_block, num_stages,
        smem_bytes=functools.partial(flash_attention_mgpu.shared_memory_bytes, q.dtype, H))

    qg, positions = _rows_by_kv_head(q, q_positions, K, G_pad, mosaic_common.ROWS // G_pad)  # 64-row programs
    num_blocks = pl.cdiv(pages_per_seq, pages_per_block)
    table = jnp.clip(page_table.astype(jnp.int32), 0, P - 1)  # entries past a sequence: in bounds, masked
    table = jnp.pad(table, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    kv_lengths = jnp.clip(kv_lengths.astype(jnp.int32), 0, pages_per_seq * page_size)
    o = flash_attention_mgpu.flash_attention_rows(
        qg, k_pages, v_pages, table, positions, kv_lengths, sliding_window=sliding_window,
        pages_per_block=pages_per_block, num_stages=num_stages, interpret=interpret)  # [B, K, T_pad * G_pad, H]
    return _heads_from_rows(o, T, G)
