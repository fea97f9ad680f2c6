"""Attention over the paged KV cache: one entry point for prefill chunks and decode steps.

Backends: "reference" (plain jnp, float32: `pallas_kernels.reference`, what every kernel is checked against),
"pallas" (the generic pallas_call kernels of pallas_kernels/: flash attention for chunks of T > 1 queries, paged
decode attention for T = 1; Triton lowering on GPU) and "pallas-interpret" (the same kernels through the Pallas
interpreter: CPU tests). None picks DEFAULT_BACKEND for the platform.
"""

from __future__ import annotations

import jax

from pallas_kernels.reference import attention_reference

BACKENDS = ("reference", "pallas", "pallas-interpret")
# The kernels have run only in interpret mode so far (no GPU was lent to the sessions that wrote them), so
# every platform defaults to the reference; make "gpu" -> "pallas" once they are checked compiled on a GPU.
DEFAULT_BACKEND = {"gpu": "reference"}


def attention(q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, backend=None):
    """q [B, T, N, H] at q_positions [B, T] attends to the first kv_lengths [B] cached positions -> [B, T, N, H]."""
    backend = backend or DEFAULT_BACKEND.get(jax.default_backend(), "reference")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
    if backend == "reference":
        return attention_reference(
            q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=sliding_window
        )
    # Imported here: loading Pallas costs ~0.6 s at start-up, which the reference backend (every platform's
    # default today) does not need.
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels.paged_attention import paged_attention

    interpret = backend == "pallas-interpret"
    if q.shape[1] == 1:  # decode: one query per sequence
        o = paged_attention(
            q[:, 0], k_pages, v_pages, page_table, q_positions[:, 0], kv_lengths,
            sliding_window=sliding_window, interpret=interpret,
        )  # [B, N, H]
        return o[:, None]
    return flash_attention(
        q, k_pages, v_pages, page_table, q_positions, kv_lengths, sliding_window=sliding_window, interpret=interpret
    )
