"""Mosaic GPU (`plgpu.kernel`) body of paged decode attention, for Hopper. The public wrapper is
`pallas_kernels.paged_attention.paged_attention(..., implementation="mosaic")`; this file holds the body,
its launcher and the constraints it checks.

One program (one warpgroup, 128 threads) per (sequence b, kv head k, split s), as in the generic body:
- The G query heads of kv head k, zero-padded to 64 rows (a wgmma tile is 64 rows; decode is memory-bound,
  so the padded rows cost tensor-core time that is free next to the page reads), are copied to SMEM once.
- Sequence b's blocks of `pages_per_block` pages are streamed into a ring of `num_stages` SMEM slots by TMA:
  one copy per page of K and one of V, page indices read from the page table in GMEM, each slot's K and V
  completing one barrier with `pages_per_block` arrivals. A slot is refilled as soon as its block is done,
  so `num_stages - 1` blocks are in flight while one is computed.
- scores [64, block_k] = q_tile @ K_block^T (wgmma, float32 accumulator), masked to the visible keys,
  online softmax in log2 units; o [64, H] += p @ V_block (wgmma, p through shared memory in q's
  dtype: Mosaic GPU's interpreter takes a wgmma operand A only from there).
- V rows of keys that are not visible are zeroed in SMEM before the p @ V wgmma: p is 0 there, but
  0 * NaN is NaN, and unwritten cache slots may hold anything. Only the first and last block of a range
  can hold such keys; the others skip the zeroing.
- Each program writes its unnormalised partial (o [Gp, H], m, l) in float32; the wrapper merges the splits
  by log-sum-exp, exactly as for the generic body.

Constraints (`mosaic_common.unsupported_reason`): 16-bit q/k/v (bf16, f16), head_dim a multiple of 64,
page_size a multiple of 8, G = N // K <= 64. Other inputs take the generic (Triton) body.

Seen to run: jax 0.10.2 and 0.11.2 lower it for CUDA on the CPU (`lowering_platforms=("cuda",)`, tested);
Mosaic GPU's interpreter runs it where the installed jax's interpreter supports the primitives used
(tested when it does). Its compiled GPU run and speed are checked with the device tool.
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

_MASKED = -1e30  # finite: exp2(_MASKED - m) is exactly 0 and m never becomes -inf


def shared_memory_bytes(q_dtype, head_dim: int, block_k: int, num_stages: int) -> int:
    """Shared memory of one program: the larger of the loop's scope (q, the K/V ring, p) and the write-back's."""
    item = jnp.dtype(q_dtype).itemsize
    loop = (ROWS * head_dim + 2 * num_stages * block_k * head_dim + ROWS * block_k) * item
    write_back = (ROWS * head_dim + 2 * ROWS) * 4
    return max(loop, write_back)


def output_rows(group: int) -> int:
    """Rows of each partial written back: G rounded up to a multiple of 8 (TMA rows of the f32 tile)."""
    return -(-group // 8) * 8


def _paged_attention_body(
    # inputs (GMEM)
    q_gmem,  # [B, K, 64, H] q.dtype, rows >= G are zeros
    k_gmem,  # [K, P, page_size, H]
    v_gmem,  # [K, P, page_size, H]
    table_gmem,  # [B, padded_pages] int32, entries clipped into [0, P)
    lo_gmem,  # [B] int32: first visible key
    hi_gmem,  # [B] int32: one past the last visible key
    # outputs (GMEM)
    o_gmem,  # [S, B, K, Gp, H] float32, unnormalised
    m_gmem,  # [S, B, K, 64] float32, running max in log2 units
    l_gmem,  # [S, B, K, 64] float32, running sum
    *,
    scale_log2: float,
    pages_per_block: int,
    blocks_per_split: int,
    num_stages: int,
):
    b = lax.axis_index("b")
    kv_head = lax.axis_index("k")
    split = lax.axis_index("s")
    _, _, page_size, head_dim = k_gmem.shape
    block_k = pages_per_block * page_size
    rows_out = o_gmem.shape[3]
    dtype = q_gmem.dtype

    lo = lo_gmem[b]
    hi = hi_gmem[b]
    first_block = jnp.maximum(split * blocks_per_split, lax.div(lo, jnp.int32(block_k)))
    end_block = jnp.minimum((split + 1) * blocks_per_split, lax.div(hi + (block_k - 1), jnp.int32(block_k)))
    num_iters = jnp.maximum(end_block - first_block, 0)

    def attend(q_smem, k_smem, v_smem, p_smem, q_ready, k_ready, v_ready):
        """The loop over this program's blocks -> (o [64, H], m [64], l [64]) float32 in registers."""
        plgpu.copy_gmem_to_smem(q_gmem.at[b, kv_head], q_smem, q_ready)
        def fetch(block, slot):
            mosaic_common.copy_block_to_ring(k_gmem, v_gmem, table_gmem.at[b], block, kv_head, slot,
                                             k_smem, v_smem, k_ready, v_ready)
        mosaic_common.fill_ring(fetch, first_block, num_iters, num_stages)
        plgpu.barrier_wait(q_ready)

        def step(i, carry):
            o, m_i, l_i = carry
            block = first_block + i
            block_start = block * block_k
            slot = lax.rem(i, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[slot])
            s = mosaic_common.scores(q_smem, k_smem.at[slot])  # [64, block_k]

            key = block_start + plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where((key >= lo) & (key < hi), s * scale_log2, _MASKED)
            m_next = jnp.maximum(m_i, s.max(axis=1))  # [64]
            alpha = jnp.exp2(m_i - m_next)  # [64]
            p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))  # [64, block_k], exactly 0 where masked
            l_next = alpha * l_i + p.sum(axis=1)
            p_smem[...] = p.astype(dtype)

            plgpu.barrier_wait(v_ready.at[slot])

            @pl.when((block_start < lo) | (block_start + block_k > hi))
            def _zero_hidden_v():
                v_key = block_start + plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0,
                                                             layout=plgpu.Layout.WGMMA)
                v = v_smem[slot]  # [block_k, H]
                v_smem.at[slot][...] = jnp.where((v_key >= lo) & (v_key < hi), v, jnp.zeros((), dtype))

            plgpu.commit_smem()  # p (and zeroed V rows) visible to the wgmma

            pv = mosaic_common.weighted_values(p_smem, v_smem.at[slot])  # [64, H]
            o = lax.broadcast_in_dim(alpha, o.shape, [0]) * o + pv

            # Both wgmmas reading the slot were awaited (their accumulators were read): refill it.
            @pl.when(i + num_stages < num_iters)
            def _refill():
                fetch(block + num_stages, slot)
            return o, m_next, l_next

        o = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        return lax.fori_loop(0, num_iters, step, (o, m_i, l_i))

    def write_back(o, m_i, l_i, o_smem, stats_smem):
        o_smem[...] = o
        stats_smem[0] = m_i
        stats_smem[1] = l_i
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows_out)], o_gmem.at[split, b, kv_head])
        plgpu.copy_smem_to_gmem(stats_smem.at[0], m_gmem.at[split, b, kv_head])
        plgpu.copy_smem_to_gmem(stats_smem.at[1], l_gmem.at[split, b, kv_head])
        plgpu.wait_smem_to_gmem(0)

    # Two scopes one after the other, so the float32 output tile reuses the K/V ring's shared memory.
    transforms = smem_transforms(dtype)
    o, m_i, l_i = pl.run_scoped(
        attend,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=transforms),  # q_smem
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=transforms),  # k_smem
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=transforms),  # v_smem
        plgpu.SMEM((ROWS, block_k), dtype, transforms=transforms),  # p_smem
        plgpu.Barrier(num_arrivals=1),  # q_ready
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # k_ready
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # v_ready
    )
    pl.run_scoped(
        functools.partial(write_back, o, m_i, l_i),
        plgpu.SMEM((ROWS, head_dim), jnp.float32),  # o_smem
        plgpu.SMEM((2, ROWS), jnp.float32),  # stats_smem: m, l
    )


def paged_attention_partials(
    q,  # [B, K, G, H]
    k_pages,  # [K, P, page_size, H]
    v_pages,  # [K, P, page_size, H]
    page_table,  # [B, padded_pages] int32, clipped into [0, P), padded to whole splits of blocks
    lo,  # [B] int32
    hi,  # [B] int32
    *,
    pages_per_block: int,
    blocks_per_split: int,
    num_splits: int,
    num_stages: int,
    interpret: bool = False,
):
    """Per-split partials (o [S, B, K, Gp, H], m [S, B, K, Gp], l [S, B, K, Gp]) float32, log2 units."""
    B, K, G, H = q.shape
    rows_out = output_rows(G)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, ROWS - G), (0, 0)))  # [B, K, 64, H]
    body = functools.partial(
        _paged_attention_body,
        scale_log2=H**-0.5 * math.log2(math.e),
        pages_per_block=pages_per_block,
        blocks_per_split=blocks_per_split,
        num_stages=num_stages,
    )
    o, m, l = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((num_splits, B, K, rows_out, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, K, ROWS), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, K, ROWS), jnp.float32),
        ),
        grid=(num_splits, K, B),
        grid_names=("s", "k", "b"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **interpret_params(interpret),
    )(q, k_pages, v_pages, page_table, lo, hi)
    return o, m[..., :rows_out], l[..., :rows_out]
