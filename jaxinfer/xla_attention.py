"""Paged attention in plain XLA ops that reads only the key blocks some query of the batch can see.

The reference (`pallas_kernels.reference.attention_reference`) gathers every page of every row and scores all
S = pages_per_seq * page_size keys: [B, K, G, T, S] float32 scores, and S grows with the cache, not with what
was written. This is the same contract (q [B, T, N, H] at q_positions [B, T] attends to keys
0..kv_lengths[b]-1, causal, inside the sliding window), computed flash-style: a `fori_loop` over blocks of
`block_keys` keys with an online softmax, whose bounds are traced from the positions and lengths. A chunk of a
chunked prefill visits the blocks from its window's start to its last query (never the padded tail of the
context); a decode step the blocks up to the longest row's length. Work and memory: [B, K, G * T, block_keys]
scores at a time, and (visible keys / block_keys) iterations.

float32 throughout at HIGHEST precision, as the reference (XLA:CPU has no batched BF16 x BF16 = F32 dot on
jax 0.10.2, and parity tests compare against HF in float32).

A quantized pool (jaxinfer.kv_cache: int8 with a scale per K/V vector, fp8 with one per layer) is read as stored:
each iteration gathers the block's codes and its scales, and the scales go where they factor out of the dots:
scores = (q . k_code) * s_k per key, and p * s_v per key before p . v_code. The block's float32 copy of the
codes is the only float temporary; the pool is never dequantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite: a block a row cannot see leaves its running max and sum unchanged, never NaN
# Keys per loop iteration (rounded to whole pages), measured on the 2-core CPU (profiles/README.md): 256, for a
# prefill chunk (of 128 / 256 / 512 with 256-token chunks: its [B, K, G * T, 256] scores stay in cache) and for a
# decode step alike. Every row of a decode reads the blocks up to the longest row's length, so a block is also the
# most a row reads past its own keys: 2,048-key blocks made the smollm2-135m forward of 16 rows at 200 tokens
# 716 ms (2,048 keys gathered per row and layer), 256-key blocks 203 ms; one row at 4,000 tokens 95 -> 78 ms.
DEFAULT_BLOCK_KEYS = 256


def _block_pages(page_size: int, pages_per_seq: int, block_keys: int) -> int:
    return max(1, min(pages_per_seq, block_keys // page_size))


def _gather_block(pages, page_ids, layer):
    """pages [K, P, ps, H] or [L, K, P, ps, H]; page_ids [B, n] -> [B, K, n * ps, H] float32: the kv head ahead of
    the keys, as the batched dots want their operand (a gather that puts it there, not a transpose after it: the
    default model's [1, 16] chunk forward at 4,000 keys 93 -> 80 ms on the 2-core CPU,
    profiles/probes/chunk_forward.py)."""
    B, n = page_ids.shape
    K, _, page_size, H = pages.shape[-4:]
    if layer is None:
        return pages[:, page_ids].transpose(1, 0, 2, 3, 4).reshape(B, K, n * page_size, H).astype(jnp.float32)
    index = jnp.stack([jnp.broadcast_to(layer, page_ids.shape).astype(page_ids.dtype), page_ids], axis=-1)  # [B, n, 2]
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(1, 3, 4), collapsed_slice_dims=(0, 2), start_index_map=(0, 2))
    block = jax.lax.gather(pages, index, dims, slice_sizes=(1, K, 1, page_size, H), mode="clip")  # [B, K, n, ps, H]
    return block.reshape(B, K, n * page_size, H).astype(jnp.float32)


def _block_scales(scales, page_ids, layer):
    """A quantized pool's scales for one block -> [B, K, W] (int8: one per vector) or [] (fp8: one per layer)."""
    if scales.ndim in (0, 1):  # per tensor: [L] with a layer index, [] without
        return scales if layer is None else scales[layer]
    return _gather_block(scales[..., None], page_ids, layer)[..., 0]  # [(L,) K, P, ps, 1] -> [B, K, W]


def _varying_like(x: jax.Array, *like: jax.Array) -> jax.Array:
    """x plus an exact zero computed from each of `like` (a sum over none of its elements): inside shard_map it
    then varies over the mesh axes they vary over, as the loop's initial carry must to have the type of what the
    body returns; outside shard_map it is x. Public API only, the same on jax 0.10 and 0.11."""
    for a in like:
        x = x + jnp.sum(a.reshape(-1)[:0]).astype(x.dtype)
    return x


def _per_key(scales: jax.Array) -> jax.Array:
    """[B, K, W] -> [B, K, 1, W], against [B, K, Q, W] scores; a per-tensor [] stays []."""
    return scales if scales.ndim == 0 else scales[:, :, None, :]


def visible_range(q_positions, kv_lengths, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """-> (lo, hi) [] int32: every key any query of the batch may see lies in [lo, hi)."""
    valid = q_positions >= 0  # [B, T]
    last = jnp.max(jnp.where(valid, q_positions, -1), axis=1)  # [B]
    hi = jnp.max(jnp.minimum(kv_lengths, last + 1))  # causal and written
    if sliding_window is None:
        return jnp.zeros((), jnp.int32), jnp.maximum(hi, 0).astype(jnp.int32)
    first = jnp.min(jnp.where(valid, q_positions, jnp.iinfo(jnp.int32).max))
    lo = jnp.maximum(first - sliding_window + 1, 0)
    return lo.astype(jnp.int32), jnp.maximum(hi, 0).astype(jnp.int32)


def blocked_attention(
    q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, layer=None,
    block_keys: int | None = None, k_scales=None, v_scales=None,
):
    """q [B, T, N, H] at q_positions [B, T] (-1 = padding) -> [B, T, N, H] in q.dtype; rows that see no key -> 0.

    block_keys: keys per iteration; None: DEFAULT_BLOCK_KEYS.
    k_scales, v_scales: a quantized pool's (int8: [(L,) K, P, page_size]; fp8: [L], or [] without a layer);
    None for float pages.

    k_pages, v_pages [K, P, page_size, H], or [L, K, P, page_size, H] with `layer` the index to read.
    page_table [B, pages_per_seq]; kv_lengths [B] keys written per row."""
    B, T, N, H = q.shape
    *_, K, _, page_size, _ = k_pages.shape
    G = N // K
    pages_per_seq = page_table.shape[1]
    block_keys = block_keys or DEFAULT_BLOCK_KEYS
    n = _block_pages(page_size, pages_per_seq, block_keys)  # pages per block
    num_blocks = -(-pages_per_seq // n)
    table = jnp.pad(page_table, ((0, 0), (0, num_blocks * n - pages_per_seq)))  # [B, num_blocks * n]; tail masked
    width = n * page_size  # keys per block

    # Queries grouped by kv head, the G heads of a group and their T positions on one axis Q = G * T (g-major).
    qg = (q.astype(jnp.float32) * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    qpos = jnp.tile(q_positions, (1, G))[:, None, :, None]  # [B, 1, Q, 1]
    lo, hi = visible_range(q_positions, kv_lengths, sliding_window)

    def step(j, carry):
        m, denom, acc = carry  # running max, softmax denominator [B, K, Q]; numerator [B, K, Q, H]
        ids = jax.lax.dynamic_slice_in_dim(table, j * n, n, axis=1)  # [B, n]
        k = _gather_block(k_pages, ids, layer)  # [B, K, W, H]
        v = _gather_block(v_pages, ids, layer)
        s = j * width + jnp.arange(width)  # [W] absolute key positions
        written = s[None, :] < kv_lengths[:, None]  # [B, W]
        # Slots past a row's length may hold anything (NaN included): zero them so 0 * NaN never appears.
        v = jnp.where(written[:, None, :, None], v, 0.0)
        scores = jnp.einsum("BKQH,BKWH->BKQW", qg, k, precision="highest")
        if k_scales is not None:
            scores = scores * _per_key(_block_scales(k_scales, ids, layer))
        mask = written[:, None, None, :] & (s <= qpos)  # [B, 1, Q, W]
        if sliding_window is not None:
            mask &= qpos - s < sliding_window
        scores = jnp.where(mask, scores, _MASKED)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))  # [B, K, Q]
        # A row with no visible key so far has m_new = _MASKED; subtracting at least _MASKED / 2 sends its masked
        # scores to exp(-5e29) = 0 (a real row's m_new is far above it), so no second select over the block.
        p = jnp.exp(scores - jnp.maximum(m_new, _MASKED / 2)[..., None])  # [B, K, Q, W]
        correction = jnp.exp(m - m_new)  # 1 while a row has seen nothing (both _MASKED)
        denom = denom * correction + jnp.sum(p, axis=-1)
        if v_scales is not None:  # an unwritten slot's scale may be anything too: zeroed as its v is
            s_v = _block_scales(v_scales, ids, layer)
            p = p * _per_key(s_v if s_v.ndim == 0 else jnp.where(written[:, None, :], s_v, 0.0))
        pv = jnp.einsum("BKQW,BKWH->BKQH", p, v, precision="highest")
        return m_new, denom, acc * correction[..., None] + pv

    init = tuple(
        _varying_like(x, q, k_pages, v_pages, page_table, q_positions, kv_lengths,
                      *(s for s in (k_scales, v_scales) if s is not None))
        for x in (
            jnp.full((B, K, G * T), _MASKED, jnp.float32),
            jnp.zeros((B, K, G * T), jnp.float32),
            jnp.zeros((B, K, G * T, H), jnp.float32),
        )
    )
    if num_blocks == 1:  # the whole table is one block (a short context): no loop to compile or run
        _, denom, acc = step(0, init)
    else:
        first_block, end_block = lo // width, -(-hi // width)
        _, denom, acc = jax.lax.fori_loop(first_block, jnp.maximum(end_block, first_block), step, init)
    seen = denom > 0  # a row with a visible key has denom >= 1 (its max term is exp(0))
    o = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)  # [B, K, Q, H]
    return o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)
