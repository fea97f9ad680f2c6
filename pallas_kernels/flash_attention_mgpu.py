"""Mosaic GPU (`plgpu.kernel`) body of prefill / chunked-prefill flash attention over the paged cache, for
Hopper. The public wrapper is `pallas_kernels.flash_attention.flash_attention(..., implementation="mosaic")`.

One program (one warpgroup) per (sequence b, block of 64 query rows, kv head k). As in the generic body, a
row is one (query position, query head of kv head k) pair, row = t * Gp + g with G padded to a power of two
Gp <= 64, so one program holds 64 // Gp query positions of all the heads that share kv head k, and every kv
page it reads serves all of them (GQA/MQA without copying K/V per head).
- q rows and their positions are copied to shared memory once; positions are loaded into the row layout of
  the wgmma accumulator, so every mask is computed per row in registers.
- The kv blocks that some row can see, [lo, hi) (computed by the wrapper from the positions, kv_length and
  the window), stream through a ring of shared-memory slots by TMA, one copy per page as in
  `paged_attention_mgpu`.
- scores [64, block_k] = q @ K^T (wgmma), per-row causal / window / length mask, online softmax in log2
  units with the probabilities of hidden keys zeroed (a row that has seen no key yet has m = masked, so
  exp2(masked - m) = 1 would count), p through shared memory into o += p @ V (wgmma).
- V rows at or past kv_length are zeroed in shared memory before the p @ V wgmma (0 * NaN = NaN; unwritten
  slots may hold anything); only a block that crosses kv_length has such rows.
- The output is normalised in the kernel (rows that saw no key, padding, are written as zeros) and stored
  in q's dtype through shared memory by TMA.

Constraints: those of `mosaic_common.unsupported_reason` (16-bit, head_dim % 64, page_size % 8,
G <= 64). Seen to run: lowered for CUDA on the CPU with jax 0.10.2 and 0.11.2, and run in Mosaic GPU's
interpreter on jax 0.11.2 (tests); compiled runs and speed are checked with the device tool.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_common
from pallas_kernels.mosaic_common import ROWS, interpret_params, smem_transforms

_MASKED = -1e30


def shared_memory_bytes(q_dtype, head_dim: int, block_k: int, num_stages: int) -> int:
    """q, positions, the K/V ring and p; the output tile reuses q's buffer."""
    item = jnp.dtype(q_dtype).itemsize
    return (ROWS * head_dim + 2 * num_stages * block_k * head_dim + ROWS * block_k) * item + ROWS * 4


def _flash_attention_body(
    # inputs (GMEM)
    q_gmem,  # [B, K, R, H] q.dtype: R = T_pad * Gp rows, row = t * Gp + g
    pos_gmem,  # [B, R] int32: each row's query position, -1 = padding
    k_gmem,  # [K, P, page_size, H]
    v_gmem,  # [K, P, page_size, H]
    table_gmem,  # [B, padded_pages] int32, clipped into [0, P)
    kv_len_gmem,  # [B] int32
    lo_gmem,  # [B, R // 64] int32: first key some row of the block can see
    hi_gmem,  # [B, R // 64] int32: one past the last
    # outputs (GMEM)
    o_gmem,  # [B, K, R, H] q.dtype
    *,
    scale_log2: float,
    pages_per_block: int,
    num_stages: int,
    sliding_window: int | None,
):
    b = lax.axis_index("b")
    q_block = lax.axis_index("q")
    kv_head = lax.axis_index("k")
    _, _, page_size, head_dim = k_gmem.shape
    block_k = pages_per_block * page_size
    dtype = q_gmem.dtype
    rows = pl.ds(q_block * ROWS, ROWS)

    kv_len = kv_len_gmem[b]
    lo = lo_gmem[b, q_block]
    hi = hi_gmem[b, q_block]
    first_block = lax.div(lo, jnp.int32(block_k))
    num_iters = jnp.maximum(lax.div(hi + (block_k - 1), jnp.int32(block_k)) - first_block, 0)

    def scoped(qo_smem, pos_smem, k_smem, v_smem, p_smem, q_ready, k_ready, v_ready):
        plgpu.copy_gmem_to_smem(q_gmem.at[b, kv_head, rows], qo_smem, q_ready)
        plgpu.copy_gmem_to_smem(pos_gmem.at[b, rows], pos_smem, q_ready)
        def fetch(block, slot):
            mosaic_common.copy_block_to_ring(k_gmem, v_gmem, table_gmem.at[b], block, kv_head, slot,
                                             k_smem, v_smem, k_ready, v_ready)
        mosaic_common.fill_ring(fetch, first_block, num_iters, num_stages)
        plgpu.barrier_wait(q_ready)
        pos = mosaic_common.load(pos_smem, plgpu.Layout.WGMMA.reduce(1))  # [64]
        pos = lax.broadcast_in_dim(pos, (ROWS, block_k), [0])  # [64, block_k]

        def step(i, carry):
            o, m_i, l_i = carry
            block_start = (first_block + i) * block_k
            slot = lax.rem(i, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[slot])
            s = mosaic_common.scores(qo_smem, k_smem.at[slot])  # [64, block_k]

            key = block_start + plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
            visible = (key < kv_len) & (key <= pos)
            if sliding_window is not None:
                visible &= pos - key < sliding_window
            s = jnp.where(visible, s * scale_log2, _MASKED)
            m_next = jnp.maximum(m_i, s.max(axis=1))  # [64]
            alpha = jnp.exp2(m_i - m_next)
            p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0])), 0.0)
            l_next = alpha * l_i + p.sum(axis=1)
            p_smem[...] = p.astype(dtype)

            plgpu.barrier_wait(v_ready.at[slot])

            @pl.when(block_start + block_k > kv_len)
            def _zero_unwritten_v():
                v_key = block_start + plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0,
                                                             layout=plgpu.Layout.WGMMA)
                v_smem.at[slot][...] = jnp.where(v_key < kv_len, v_smem[slot], jnp.zeros((), dtype))

            plgpu.commit_smem()

            pv = mosaic_common.weighted_values(p_smem, v_smem.at[slot])  # [64, H]
            o = lax.broadcast_in_dim(alpha, o.shape, [0]) * o + pv

            @pl.when(i + num_stages < num_iters)
            def _refill():
                fetch(first_block + i + num_stages, slot)
            return o, m_next, l_next

        o = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        o, m_i, l_i = lax.fori_loop(0, num_iters, step, (o, m_i, l_i))

        # l = 0 exactly when the row saw no key (padding): zeros, as the reference writes.
        inv_l = jnp.where(l_i > 0, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
        qo_smem[...] = (o * lax.broadcast_in_dim(inv_l, o.shape, [0])).astype(dtype)  # q is no longer read
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_gmem.at[b, kv_head, rows])
        plgpu.wait_smem_to_gmem(0)

    transforms = smem_transforms(dtype)
    pl.run_scoped(
        scoped,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=transforms),  # qo_smem: q, then the output
        plgpu.SMEM((ROWS,), jnp.int32),  # pos_smem
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=transforms),  # k_smem
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=transforms),  # v_smem
        plgpu.SMEM((ROWS, block_k), dtype, transforms=transforms),  # p_smem
        plgpu.Barrier(num_arrivals=2),  # q_ready: q rows and their positions
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # k_ready
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # v_ready
    )


def flash_attention_rows(
    q_rows,  # [B, K, R, H], R a multiple of 64
    k_pages,  # [K, P, page_size, H]
    v_pages,  # [K, P, page_size, H]
    page_table,  # [B, padded_pages] int32, clipped into [0, P), whole blocks
    row_positions,  # [B, R] int32, -1 = padding
    kv_lengths,  # [B] int32, clipped into [0, pages_per_seq * page_size]
    *,
    sliding_window: int | None,
    pages_per_block: int,
    num_stages: int,
    interpret: bool = False,
):
    """Attention of every row -> [B, K, R, H] in q's dtype (rows that see no key are zeros)."""
    B, K, R, H = q_rows.shape
    # Keys some row of each 64-row block can see: [lo, hi).
    pos = row_positions.reshape(B, R // ROWS, ROWS)
    is_query = pos >= 0
    hi = jnp.minimum(jnp.where(is_query, pos, -1).max(axis=2) + 1, kv_lengths[:, None])  # [B, R // 64]
    lo = jnp.zeros_like(hi)
    if sliding_window is not None:
        first = jnp.where(is_query, pos, jnp.iinfo(jnp.int32).max).min(axis=2)
        lo = jnp.clip(first - (sliding_window - 1), 0, None)
    body = functools.partial(
        _flash_attention_body,
        scale_log2=H**-0.5 * math.log2(math.e),
        pages_per_block=pages_per_block,
        num_stages=num_stages,
        sliding_window=sliding_window,
    )
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
        grid=(K, R // ROWS, B),
        grid_names=("k", "q", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **interpret_params(interpret),
    )(q_rows, row_positions, k_pages, v_pages, page_table, kv_lengths, lo, hi)
