"""Attention over the paged KV cache: one entry point for prefill chunks and decode steps.

The plain-jnp path here is the reference every Pallas kernel is checked against. Kernels register
themselves in KERNELS (pallas_kernels arrive with issue 4); until then every backend resolves to it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer import kv_cache

BACKENDS = ("reference", "pallas", "pallas-interpret")
# backend name -> attention function with the signature of `attention_reference`.
KERNELS: dict[str, Callable] = {}
_MASKED = -1e30  # finite, so a row with no visible key gives zeros instead of NaN


def attention(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, backend=None):
    """q [B, T, N, H] at q_positions [B, T] attends to the first kv_lengths [B] cached positions -> [B, T, N, H].

    backend: None picks a registered kernel for the platform if there is one, else the reference.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
    fn = KERNELS.get(_resolve_backend(backend), attention_reference)
    return fn(q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=sliding_window)


def _resolve_backend(backend: str | None) -> str:
    if backend is not None:
        return backend
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def visible_keys(q_positions, kv_lengths, num_keys: int, sliding_window: int | None) -> jax.Array:
    """q_positions [B, T], kv_lengths [B] -> mask [B, T, S]: key s is written, causal, and inside the window."""
    s = jnp.arange(num_keys)[None, None, :]  # [1, 1, S]
    q = q_positions[:, :, None]  # [B, T, 1]
    mask = (s < kv_lengths[:, None, None]) & (s <= q)
    if sliding_window is not None:
        mask &= q - s < sliding_window
    return mask


def attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None):
    """Gather each sequence's pages into a contiguous [B, K, S, H] and attend in float32."""
    B, T, N, H = q.shape
    K = k_pages.shape[0]
    k = kv_cache.gather(k_pages, page_table)  # [B, K, S, H]
    v = kv_cache.gather(v_pages, page_table)  # [B, K, S, H]
    S = k.shape[2]
    written = jnp.arange(S)[None, :] < kv_lengths[:, None]  # [B, S]
    # Slots past a sequence's length may hold anything (NaN included): zero them so 0 * NaN never appears.
    v = jnp.where(written[:, None, :, None], v, jnp.zeros((), v.dtype))
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32) * H**-0.5
    mask = visible_keys(q_positions, kv_lengths, S, sliding_window)[:, None, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(v.dtype)
    o = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    o = jnp.where(jnp.any(mask, axis=-1).transpose(0, 3, 1, 2)[..., None], o, 0.0)  # rows that see no key -> 0
    return o.reshape(B, T, N, H).astype(q.dtype)  # [B, T, N, H]
