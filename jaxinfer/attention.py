"""Attention over the paged KV cache: one entry point for prefill chunks and decode steps.

Backends:
- "xla" (the default on every platform): `jaxinfer.xla_attention.blocked_attention`, plain XLA ops that read
  only the key blocks a query can see, flash-style, so a chunk of a long prompt never scores the padded context.
- "reference": `pallas_kernels.reference`, the gather-every-page float32 reference every backend is checked
  against; slow, simple enough to trust.
- "pallas": the generic pallas_call kernels of pallas_kernels/ (flash attention for chunks of T > 1 queries,
  paged decode attention for T = 1; Triton lowering on GPU); "pallas-interpret": the same kernels through the
  Pallas interpreter (CPU tests).
None picks DEFAULT_BACKEND for the platform.

A quantized cache (jaxinfer.kv_cache: int8 or fp8 pages with their scales) is read by "xla" and "reference";
the Pallas kernels read float pages only and refuse one by name.
"""

from __future__ import annotations

import jax

from jaxinfer.kv_cache import kv_cache_dtype_of
from jaxinfer.xla_attention import blocked_attention
from pallas_kernels.reference import attention_reference

BACKENDS = ("xla", "reference", "pallas", "pallas-interpret")
# The kernels have run only in interpret mode so far (no GPU was lent to the sessions that wrote them), so
# every platform defaults to plain XLA; make "gpu" -> "pallas" once they are checked compiled on a GPU.
DEFAULT_BACKEND: dict[str, str] = {}
FALLBACK_BACKEND = "xla"
QUANTIZED_CACHE_BACKENDS = ("xla", "reference")  # the backends that read int8 / fp8 pages and their scales


def resolve_backend(backend: str | None) -> str:
    """None -> the platform's default; anything else is checked against BACKENDS."""
    backend = backend or DEFAULT_BACKEND.get(jax.default_backend(), FALLBACK_BACKEND)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
    return backend


def check_backend_reads(backend: str | None, kv_cache_dtype: str | None) -> None:
    """ValueError naming both unless this attention backend reads a cache of this kv_cache_dtype."""
    if kv_cache_dtype is not None and resolve_backend(backend) not in QUANTIZED_CACHE_BACKENDS:
        raise ValueError(f"attention backend={resolve_backend(backend)!r} reads float caches only, not "
                         f"kv_cache_dtype={kv_cache_dtype!r}; use one of {QUANTIZED_CACHE_BACKENDS}")


def attention(
    q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, backend=None, layer=None,
    k_scales=None, v_scales=None,
):
    """q [B, T, N, H] at q_positions [B, T] attends to the first kv_lengths [B] cached positions -> [B, T, N, H].

    k_pages, v_pages: [K, P, page_size, H], or the stacked [L, K, P, page_size, H] with `layer` the index to read
    (traced inside the decoder's layer scan). k_scales, v_scales: a quantized pool's scales (KVCache's), else None."""
    backend = resolve_backend(backend)
    args = (q, k_pages, v_pages, page_table, q_positions, kv_lengths)
    scales = {"k_scales": k_scales, "v_scales": v_scales}
    if backend == "xla":
        return blocked_attention(*args, sliding_window=sliding_window, layer=layer, **scales)
    if backend == "reference":
        return attention_reference(*args, sliding_window=sliding_window, layer=layer, **scales)
    check_backend_reads(backend, kv_cache_dtype_of(k_pages))
    # Imported here: loading Pallas costs ~0.6 s at start-up, which the default backend does not need.
    from pallas_kernels.flash_attention import flash_attention
    from pallas_kernels.paged_attention import paged_attention

    if layer is not None:
        # The kernels take one layer's pool: this slice is a copy of that layer's pages per step (a pallas_call's
        # operands are materialised). Passing the layer as a scalar-prefetch index is the kernels' next change.
        k_pages, v_pages = k_pages[layer], v_pages[layer]
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
