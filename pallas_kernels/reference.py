"""The plain-jnp reference both attention kernels are checked against, in float32 at HIGHEST precision.

`attention_reference` is flash_attention's contract (q [B, T, N, H] at q_positions [B, T]) and
`paged_attention_reference` paged_attention's (one query per sequence, q [B, N, H] at q_positions [B]); both
take their arguments in the order of `jaxinfer.attention.attention`, whose "reference" backend is this file.
It gathers each sequence's pages into contiguous K/V, so it reads every page of the table: slow, and simple
enough to trust.

Quantized caches (jaxinfer.kv_cache's kv_cache_dtype) come with their scales: int8 pages with k_scales/v_scales
[(L,) K, P, page_size] (one per K/V vector), float8_e4m3fn pages with one scale per tensor ([L] with a layer index,
[] without). The reference dequantizes everything it gathers to float32 first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row with no visible key gives zeros instead of NaN


def gather_pages(pages: jax.Array, page_table: jax.Array, layer=None) -> jax.Array:
    """pages [K, P, page_size, H] (or [L, K, P, page_size, H] and a layer index), page_table [B, pages_per_seq]
    -> contiguous [B, K, S, H].

    S = pages_per_seq * page_size: every page of the row, written or not (the caller masks by length). With a
    layer index the gather reads the stacked pool directly: one gather, no copy of the layer's slice."""
    *_, K, _, page_size, H = pages.shape
    B, pages_per_seq = page_table.shape
    if layer is None:
        x = pages[:, page_table].transpose(1, 0, 2, 3, 4)  # [K, B, pages_per_seq, page_size, H] -> [B, K, ...]
    else:  # the scalar and the table are split by a slice: the indexed dims come first
        x = pages[layer, :, page_table].transpose(0, 2, 1, 3, 4)  # [B, pages_per_seq, K, page_size, H] -> [B, K, ...]
    return x.reshape(B, K, pages_per_seq * page_size, H)  # [B, K, S, H]


def dequantized_pages(pages: jax.Array, scales: jax.Array | None, page_table: jax.Array, layer=None) -> jax.Array:
    """gather_pages in float32 times the scales: [B, K, S, H]. scales None: a float pool; one dim short of pages:
    one scale per vector (int8); else one per tensor ([L] with a layer index, [] without)."""
    x = gather_pages(pages, page_table, layer).astype(jnp.float32)  # [B, K, S, H]
    if scales is None:
        return x
    if scales.ndim == pages.ndim - 1:
        return x * gather_pages(scales[..., None], page_table, layer)  # [B, K, S, 1]
    return x * (scales if layer is None else scales[layer])


def visible_keys(q_positions, kv_lengths, num_keys: int, sliding_window: int | None) -> jax.Array:
    """q_positions [B, T], kv_lengths [B] -> mask [B, T, S]: key s is written, causal, and inside the window."""
    s = jnp.arange(num_keys)[None, None, :]  # [1, 1, S]
    q = q_positions[:, :, None]  # [B, T, 1]
    mask = (s < kv_lengths[:, None, None]) & (s <= q)
    if sliding_window is not None:
        mask &= q - s < sliding_window
    return mask


def attention_reference(
    q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, layer=None, k_scales=None,
    v_scales=None,
):
    """q [B, T, N, H] at q_positions [B, T] (-1 = padding), keys 0..kv_lengths[b]-1 -> [B, T, N, H] in q.dtype.

    layer: None for pages [K, P, page_size, H]; an index into stacked pages [L, K, P, page_size, H].
    k_scales, v_scales: a quantized pool's scales (see the module docstring); None for float pages.

    Gathers each sequence's pages into a contiguous [B, K, S, H] and attends, all in float32. float32 operands,
    not 16-bit ones with a float32 result: besides being the reference's precision, XLA:CPU (jax 0.10.2) fails
    at run time on some batched BF16 x BF16 = F32 dots ("Unsupported element type for DotThunk::Execute").
    """
    B, T, N, H = q.shape
    k = dequantized_pages(k_pages, k_scales, page_table, layer)  # [B, K, S, H]
    v = dequantized_pages(v_pages, v_scales, page_table, layer)  # [B, K, S, H]
    K = k.shape[1]
    S = k.shape[2]
    written = jnp.arange(S)[None, :] < kv_lengths[:, None]  # [B, S]
    # Slots past a sequence's length may hold anything (NaN included): zero them so 0 * NaN never appears.
    v = jnp.where(written[:, None, :, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, precision="highest") * H**-0.5
    mask = visible_keys(q_positions, kv_lengths, S, sliding_window)[:, None, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1)
    o = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v, precision="highest")  # no TF32 on GPU: this is the reference
    o = jnp.where(jnp.any(mask, axis=-1).transpose(0, 3, 1, 2)[..., None], o, 0.0)  # rows that see no key -> 0
    return o.reshape(B, T, N, H).astype(q.dtype)  # [B, T, K, G, H] -> [B, T, N, H]


def paged_attention_reference(
    q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, k_scales=None, v_scales=None
):
    """Decode: q [B, N, H] at q_positions [B] -> [B, N, H] in q.dtype; `attention_reference` with T = 1."""
    o = attention_reference(q[:, None], k_pages, v_pages, page_table, q_positions[:, None], kv_lengths,
                            sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales)  # [B, 1, N, H]
    return o[:, 0]  # [B, N, H]
