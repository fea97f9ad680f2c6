"""Attention over the paged KV cache: one entry point for prefill chunks and decode steps.

Backends:
- "cpu" (the default on the CPU when jaxinfer.cpu_kernels built, JAXINFER_CPU_KERNELS=auto|on|off):
  `jaxinfer.cpu_kernels.paged_attention`, a C++ kernel through jax.ffi that reads the pool where it lies (the
  stacked pool and the layer index as they are, pages through the table, int8 / fp8 codes with their scales),
  online softmax in float32, threads from XLA's pool. Decode steps and chunks of up to CPU_KERNEL_MAX_QUERIES
  queries; a longer prefill chunk goes to "xla", which was faster there (a 512-token chunk over 2,000 keys:
  33 ms in the kernel, 25 ms in XLA; level at 16, profiles/probes/cpu_paged_attention.py).
- "xla" (the default elsewhere, and on the CPU without the kernels): `jaxinfer.xla_attention.blocked_attention`,
  plain XLA ops that read only the key blocks a query can see, flash-style, so a chunk of a long prompt never
  scores the padded context.
- "reference": `pallas_kernels.reference`, the gather-every-page float32 reference every backend is checked
  against; slow, simple enough to trust.
- "pallas": the generic pallas_call kernels of pallas_kernels/ (flash attention for chunks of T > 1 queries,
  paged decode attention for T = 1; Triton lowering on GPU); "pallas-interpret": the same kernels through the
  Pallas interpreter (CPU tests).
None picks the platform's default (`default_backend()`).

A quantized cache (jaxinfer.kv_cache: int8 or fp8 pages with their scales) is read by "cpu", "xla" and
"reference"; the Pallas kernels read float pages only and refuse one by name.
"""

from __future__ import annotations

import jax

from jaxinfer import cpu_kernels
from jaxinfer.cpu_kernels.paged_attention import paged_attention as cpu_paged_attention
from jaxinfer.kv_cache import kv_cache_dtype_of
from jaxinfer.xla_attention import blocked_attention
from pallas_kernels.reference import attention_reference

BACKENDS = ("xla", "cpu", "reference", "pallas", "pallas-interpret")
CPU_KERNEL_MAX_QUERIES = 16  # "cpu": rows of up to this many queries to the kernel, longer chunks to "xla"
# The Pallas kernels have run only in interpret mode so far (no GPU was lent to the sessions that wrote them), so
# other platforms default to plain XLA; make "gpu" -> "pallas" once they are checked compiled on a GPU.
DEFAULT_BACKEND: dict[str, str] = {}
FALLBACK_BACKEND = "xla"
QUANTIZED_CACHE_BACKENDS = ("xla", "cpu", "reference")  # the backends that read int8 / fp8 pages and their scales


def default_backend() -> str:
    """The platform's backend: "cpu" on the CPU where the kernels built, else DEFAULT_BACKEND's or "xla"."""
    platform = jax.default_backend()
    if platform == "cpu" and cpu_kernels.available():
        return "cpu"
    return DEFAULT_BACKEND.get(platform, FALLBACK_BACKEND)


def resolve_backend(backend: str | None) -> str:
    """None -> the platform's default; anything else is checked against BACKENDS, and "cpu" against the kernels
    having built."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
    if backend == "cpu" and jax.default_backend() != "cpu":
        raise ValueError(f"attention backend='cpu' runs on the CPU platform only, not {jax.default_backend()!r}")
    if backend == "cpu" and not cpu_kernels.available():
        raise ValueError(f"attention backend='cpu' needs the CPU kernels, which are unavailable: "
                         f"{cpu_kernels.unavailable_reason()}")
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
    if backend == "cpu" and q.shape[1] <= CPU_KERNEL_MAX_QUERIES:
        return cpu_paged_attention(*args, sliding_window=sliding_window, layer=layer, **scales)
    if backend == "cpu":  # a long prefill chunk: XLA's blocked dots beat the kernel's there
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
