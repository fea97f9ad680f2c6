"""Attention over the paged KV cache: one entry point for prefill chunks and decode steps.

Backends: "reference" (plain jnp, float32: what every kernel is checked against), "pallas" (the generic
pallas_call kernels of pallas_kernels/: flash attention for chunks of T > 1 queries, paged decode attention
for T = 1; Triton lowering on GPU) and "pallas-interpret" (the same kernels through the Pallas interpreter:
CPU tests). None picks DEFAULT_BACKEND for the platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer import kv_cache

BACKENDS = ("reference", "pallas", "pallas-interpret")
# The kernels have run only in interpret mode so far (no GPU was lent to the sessions that wrote them), so
# every platform defaults to the reference; make "gpu" -> "pallas" once they are checked compiled on a GPU.
DEFAULT_BACKEND = {"gpu": "reference"}
_MASKED = -1e30  # finite, so a row with no visible key gives zeros instead of NaN


def attention(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, backend=None):
    """q [B, T, N, H] at q_positions [B, T] attends to the first kv_lengths [B] cached positions -> [B, T, N, H]."""
    backend = backend or DEFAULT_BACKEND.get(jax.default_backend(), "reference")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
    if backend == "reference":
        return attention_reference(
            q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=sliding_window
        )
    # Imported here: pallas_kernels imports this module for its references.
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels.paged_attention import paged_attention

    interpret = backend == "pallas-interpret"
    if q.shape[1] == 1:  # decode: one query per sequence
        o = paged_attention(
            q[:, 0], k_pages, v_pages, page_table, kv_lengths, q_positions[:, 0],
            sliding_window=sliding_window, interpret=interpret,
        )  # [B, N, H]
        return o[:, None]
    return flash_attention(
        q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=sliding_window, interpret=interpret
    )


def visible_keys(q_positions, kv_lengths, num_keys: int, sliding_window: int | None) -> jax.Array:
    """q_positions [B, T], kv_lengths [B] -> mask [B, T, S]: key s is written, causal, and inside the window."""
    s = jnp.arange(num_keys)[None, None, :]  # [1, 1, S]
    q = q_positions[:, :, None]  # [B, T, 1]
    mask = (s < kv_lengths[:, None, None]) & (s <= q)
    if sliding_window is not None:
        mask &= q - s < sliding_window
    return mask


def attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None):
    """Gather each sequence's pages into a contiguous [B, K, S, H] and attend, all in float32.

    float32 operands, not 16-bit ones with a float32 result: besides being the reference's precision, XLA:CPU
    (jax 0.10.2) fails at run time on some batched BF16 x BF16 = F32 dots ("Unsupported element type for
    DotThunk::Execute").
    """
    B, T, N, H = q.shape
    K = k_pages.shape[0]
    k = kv_cache.gather(k_pages, page_table).astype(jnp.float32)  # [B, K, S, H]
    v = kv_cache.gather(v_pages, page_table).astype(jnp.float32)  # [B, K, S, H]
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
    return o.reshape(B, T, N, H).astype(q.dtype)  # [B, T, N, H]
