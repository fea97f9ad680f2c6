"""Paged attention on the CPU through jax.ffi: queries against the KV pool as it lies, following the page table.

Kernel (paged_attention.cc + paged_attention_tile.inc, built by build.py), wrapper (`paged_attention`), reference
(`paged_attention_reference`: pallas_kernels.reference's gather-every-page attention, plain jnp in float32, the one
every attention backend is checked against). The contract is jaxinfer.attention.attention's: q [B, T, N, H] at
q_positions [B, T] (-1: padding, output 0) sees keys s < kv_lengths[b], s <= its position and, with a sliding window
w, s > position - w; softmax(q k / sqrt(H)) in float32. One call serves decode (T = 1) and prefill chunks (T > 1).

Pages: float32, bfloat16, int8 with a float32 scale per K/V vector ([(L,) K, P, page_size]) or float8_e4m3fn with
one per layer ([L], or [] without a layer), as jaxinfer.kv_cache stores them. The stacked pool [L, K, P, page_size,
H] goes in whole with `layer` (a traced int32 scalar, the decoder's scan index): the kernel reads that layer's pages
in place, so no slice of the pool is ever copied.

    JAXINFER_CPU_KERNELS_ISA=scalar|avx2|avx512   the highest instruction set the kernel may use (default: the best
                                                  the CPU has), shared with qmatmul
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu_kernels import build
from pallas_kernels.reference import attention_reference

TARGET = "jaxinfer_paged_attention"
ISAS = ("scalar", "avx2", "avx512")  # paged_attention.cc's Isa values 1, 2, 3
ISA_ENV = build.ISA_ENV
PAGE_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn))
MAX_GROUP = 64  # query heads per kv head (paged_attention.cc's kMaxRows)

paged_attention_reference = attention_reference


def supported_isas() -> tuple[str, ...]:
    """The instruction sets the kernel may use on this CPU, lowest first (builds the kernels if need be; see
    build.UNVERIFIED_ISAS)."""
    handle = build.library().handle
    handle.jaxinfer_paged_attention_best_isa.restype = np.ctypeslib.ctypes.c_int64
    return build.usable_isas(ISAS, handle.jaxinfer_paged_attention_best_isa())


def _isa_code(isa: str | None) -> int:
    """isa (None: $JAXINFER_CPU_KERNELS_ISA, else the best) -> the kernel's `isa` attribute (0: the best). The
    environment's is a ceiling (clipped to what the CPU runs); an explicit isa the CPU lacks is a ValueError."""
    chosen = isa or os.environ.get(ISA_ENV) or None
    if chosen is None:
        return len(supported_isas())  # the best usable
    if chosen not in ISAS:
        raise ValueError(f"isa={chosen!r} must be one of {ISAS} (or set {ISA_ENV})")
    supported = supported_isas()
    if isa is not None and isa not in supported:
        raise ValueError(f"isa={isa!r} is not available on this CPU, which runs {supported}")
    return min(ISAS.index(chosen) + 1, len(supported))


def _check_scales(pages, scales, name: str, layer) -> jax.Array:
    """A pool's scales -> the float32 operand the kernel reads ([1] dummies for float pages)."""
    if pages.dtype == jnp.int8:
        if scales is None or scales.shape != pages.shape[:-1] or scales.dtype != jnp.float32:
            raise ValueError(f"int8 pages {pages.shape} need float32 {name} of shape {pages.shape[:-1]}, got "
                             f"{None if scales is None else (scales.shape, scales.dtype)}")
        return scales
    if pages.dtype == jnp.float8_e4m3fn:
        want = (pages.shape[0],) if layer is not None else ()
        if scales is None or scales.shape != want or scales.dtype != jnp.float32:
            raise ValueError(f"float8_e4m3fn pages need float32 {name} of shape {want}, got "
                             f"{None if scales is None else (scales.shape, scales.dtype)}")
        return scales.reshape(-1)  # [] -> [1]
    if scales is not None:
        raise ValueError(f"{pages.dtype} pages take no {name}")
    return jnp.zeros((1,), jnp.float32)


def paged_attention(
    q, k_pages, v_pages, page_table, q_positions, kv_lengths, *, sliding_window=None, layer=None, k_scales=None,
    v_scales=None, threads: int | None = None, isa: str | None = None,
):
    """q [B, T, N, H] at q_positions [B, T] attends to keys 0..kv_lengths[b]-1 of its pages -> [B, T, N, H] in
    q.dtype (float32 inside).

    k_pages, v_pages: [K, P, page_size, H], or the stacked [L, K, P, page_size, H] with `layer` the index to read.
    page_table [B, pages_per_seq] int32; kv_lengths [B] int32. k_scales, v_scales: a quantized pool's (see the
    module), else None. threads: at most this many threads of XLA's intra-op pool (None: all); isa: the highest
    instruction set (None: $JAXINFER_CPU_KERNELS_ISA, else the CPU's best). Works under jit, lax.scan (a traced
    layer), vmap (sequential) and shard_map (the local kv heads)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
    B, T, N, H = q.shape
    stacked = k_pages.ndim == 5
    if k_pages.ndim not in (4, 5) or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages {k_pages.shape} {k_pages.dtype} and v_pages {v_pages.shape} {v_pages.dtype} must "
                         f"be one shape [(L,) K, P, page_size, H] and dtype")
    if stacked != (layer is not None):
        raise ValueError(f"layer must be given exactly when the pages are stacked [L, ...]; pages {k_pages.shape}, "
                         f"layer={layer!r}")
    if jnp.dtype(k_pages.dtype) not in PAGE_DTYPES:
        raise ValueError(f"pages dtype {k_pages.dtype} must be one of {[str(d) for d in PAGE_DTYPES]}")
    K, _, _, page_h = k_pages.shape[-4:]
    if page_h != H or N % K or N // K > MAX_GROUP:
        raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape}: head_dim must match and N={N} be a "
                         f"multiple of K={K} (at most {MAX_GROUP} heads per kv head)")
    if page_table.ndim != 2 or page_table.shape[0] != B or q_positions.shape != (B, T) or kv_lengths.shape != (B,):
        raise ValueError(f"page_table {page_table.shape} must be [B={B}, pages_per_seq], q_positions "
                         f"{q_positions.shape} [B, T] = {(B, T)}, kv_lengths {kv_lengths.shape} [B]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be None or at least 1")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    k_operand = _check_scales(k_pages, k_scales, "k_scales", layer)
    v_operand = _check_scales(v_pages, v_scales, "v_scales", layer)
    if not stacked:  # one layer: a leading dim of 1, a bitcast, not a copy
        k_pages, v_pages = k_pages[None], v_pages[None]  # [K, P, ps, H] -> [1, K, P, ps, H]
        if k_pages.dtype == jnp.int8:
            k_operand, v_operand = k_operand[None], v_operand[None]  # [K, P, ps] -> [1, K, P, ps]
        layer = 0
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((B, T, N, H), jnp.float32), vmap_method="sequential")
    build.library()  # built and registered before the call is lowered
    o = call(
        q.astype(jnp.float32), k_pages, v_pages, k_operand, v_operand, page_table.astype(jnp.int32),
        q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32), jnp.asarray(layer, jnp.int32),
        sliding_window=np.int64(sliding_window or 0), threads=np.int64(threads or 0), isa=np.int64(_isa_code(isa)),
    )
    return o.astype(q.dtype)
