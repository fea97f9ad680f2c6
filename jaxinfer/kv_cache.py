"""The paged KV cache: a preallocated pytree passed into every step and returned updated (donated under jit).

One pool of pages per layer, the layers stacked on a leading axis (the decoder scans over it); each sequence owns
a row of the page table. Which pages a sequence gets is
decided host side (jaxinfer/page_allocator.py); this file only writes K/V into the pool. Reads belong to
attention: the reference gathers pages (`pallas_kernels.reference.gather_pages`), the kernels follow the table.

The pool's dtype (kv_cache_dtype) is part of the pytree:
- None: the model's dtype; k_scales and v_scales are None, so a float cache is the pytree it always was.
- "int8": symmetric int8 with a float32 scale per written K/V vector (one token, one kv head): s = max|x| / 127,
  q = round(x / s). 1 + 4 / H bytes per element (H = 64: 68 bytes per vector against float32's 256).
- "fp8": float8_e4m3fn with a float32 scale per layer for K and for V (vLLM's per-tensor kv scales), 1.0 unless
  set: x / s clipped to +-448 (e4m3's largest finite value), then rounded to e4m3.
Attention applies the scales while it reads a block (jaxinfer.xla_attention); nothing dequantizes the pool.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.quant_modes import KV_CACHE_DTYPES

STORAGE_DTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
INT8_MAX = 127
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def check_kv_cache_dtype(kv_cache_dtype) -> str | None:
    """kv_cache_dtype itself, or ValueError naming it."""
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES} or None")
    return kv_cache_dtype


def kv_cache_dtype_of(pages: jax.Array) -> str | None:
    """The kv_cache_dtype pages [.., K, P, page_size, H] are stored in (None: a float pool)."""
    return {v: k for k, v in STORAGE_DTYPES.items()}.get(jnp.dtype(pages.dtype))


class Pool(NamedTuple):
    """What each layer reads and writes: the pages and, quantized, their scales (a float pool's scales are None,
    so its pytree leaves are the two page arrays alone)."""

    k_pages: jax.Array  # [L, K, P, page_size, H]
    v_pages: jax.Array  # [L, K, P, page_size, H]
    k_scales: jax.Array | None = None  # int8: [L, K, P, page_size] float32; fp8: [L] float32; float: None
    v_scales: jax.Array | None = None  # as k_scales


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k_pages: jax.Array  # [L, K, P, page_size, H] in the model's dtype, int8 or float8_e4m3fn
    v_pages: jax.Array  # [L, K, P, page_size, H]
    page_table: jax.Array  # [max_seqs, pages_per_seq] int32: page of each block of page_size positions
    lengths: jax.Array  # [max_seqs] int32: tokens already written per sequence
    k_scales: jax.Array | None = None  # int8: [L, K, P, page_size] float32, one per K vector; fp8: [L]; float: None
    v_scales: jax.Array | None = None  # as k_scales, for V

    @property
    def num_layers(self) -> int:
        return self.k_pages.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[2]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def max_seqs(self) -> int:
        return self.page_table.shape[0]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def kv_cache_dtype(self) -> str | None:
        return kv_cache_dtype_of(self.k_pages)

    @property
    def pool(self) -> Pool:
        return Pool(self.k_pages, self.v_pages, self.k_scales, self.v_scales)

    def with_pool(self, pool: Pool, lengths: jax.Array) -> KVCache:
        return dataclasses.replace(self, **pool._asdict(), lengths=lengths)


def init_cache(
    cfg: ModelConfig, *, num_pages: int, page_size: int, max_seqs: int, pages_per_seq: int, dtype=None,
    kv_cache_dtype: str | None = None,
) -> KVCache:
    """An empty pool. Unused slots hold zeros; nothing reads a slot at or past a sequence's length.

    dtype: a float pool's dtype (None: the model's); kv_cache_dtype: "int8" | "fp8" | None (see the module)."""
    for name, value in (("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs),
                        ("pages_per_seq", pages_per_seq)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int")
    check_kv_cache_dtype(kv_cache_dtype)
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)  # [L, K, P, page_size, H]
    scales = {
        None: None,
        "int8": lambda: jnp.zeros(shape[:-1], jnp.float32),  # [L, K, P, page_size]
        "fp8": lambda: jnp.ones(shape[:1], jnp.float32),  # [L]: 1.0, vLLM's default kv scale
    }[kv_cache_dtype]
    dtype = STORAGE_DTYPES[kv_cache_dtype] if kv_cache_dtype else (dtype or cfg.jnp_dtype)
    return KVCache(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        page_table=jnp.zeros((max_seqs, pages_per_seq), jnp.int32),
        lengths=jnp.zeros((max_seqs,), jnp.int32),
        k_scales=None if scales is None else scales(),
        v_scales=None if scales is None else scales(),
    )


def bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str | None = None, *, num_kv_heads: int | None = None) -> int:
    """Bytes one token's K and V take in the pool, over every layer and kv head, scales included (fp8's per-layer
    scales are not per token)."""
    check_kv_cache_dtype(kv_cache_dtype)
    K = num_kv_heads or cfg.num_kv_heads
    per_vector = {None: cfg.head_dim * cfg.jnp_dtype.itemsize, "int8": cfg.head_dim + 4, "fp8": cfg.head_dim}
    return 2 * cfg.num_layers * K * per_vector[kv_cache_dtype]


def nbytes(cache: KVCache) -> int:
    """Bytes the cache's arrays take (on a mesh: over every device), from shapes alone (ShapeDtypeStructs too)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def page_addresses(page_table: jax.Array, positions: jax.Array, num_pages: int, page_size: int):
    """page_table [B, pages_per_seq], positions [B, T] -> (page [B, T], slot [B, T]).

    Padding (position -1) gets page index num_pages: out of bounds, so a scatter with mode="drop" skips it.
    """
    safe = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(page_table, safe // page_size, axis=1)  # [B, T]
    page = jnp.where(positions >= 0, page, num_pages)
    return page, safe % page_size


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (q [..., H] int8, scale [...] float32), x ~ q * scale within half a step (scale / 2) per
    element. An all-zero vector gets scale 0 and q 0."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX  # [...]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def quantize_fp8(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x [...] with a per-tensor scale [] -> x / scale clipped to +-FP8_MAX, in float8_e4m3fn."""
    return jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def write(
    k_pages: jax.Array,  # [L, K, P, page_size, H]
    v_pages: jax.Array,  # [L, K, P, page_size, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    page_table: jax.Array,  # [B, pages_per_seq] rows of the sequences in this batch
    positions: jax.Array,  # [B, T], -1 for padding
    layer: jax.Array | int,  # [] the layer whose pool is written (traced inside the layer scan)
) -> tuple[jax.Array, jax.Array]:
    """Scatter this chunk's K/V into layer `layer`'s (page, slot) addresses of a float pool; padding writes nothing.
    (write_at takes any Pool, quantized ones too.)"""
    assert kv_cache_dtype_of(k_pages) is None, "a quantized pool has scales: write_at(cache.pool, ...)"
    _, _, num_pages, page_size, _ = k_pages.shape
    page, slot = page_addresses(page_table, positions, num_pages, page_size)
    pool = write_at(Pool(k_pages, v_pages), k, v, page, slot, layer)
    return pool.k_pages, pool.v_pages


def write_at(pool: Pool, k, v, page, slot, layer) -> Pool:
    """k, v [..., K, H] into layer `layer` at page_addresses' (page, slot) [...] (page num_pages: dropped),
    quantized to the pool's kv_cache_dtype as they are scattered.

    One scatter into the whole stacked pool per array (in place under donation), never a copy of the layer's slice."""
    kind = kv_cache_dtype_of(pool.k_pages)
    k_pages, k_scales = _write_one(pool.k_pages, pool.k_scales, k, page, slot, layer, kind)
    v_pages, v_scales = _write_one(pool.v_pages, pool.v_scales, v, page, slot, layer, kind)
    return Pool(k_pages, v_pages, k_scales, v_scales)


def _write_one(pages, scales, x, page, slot, layer, kind):
    # [layer, :, page, slot]: the scalar and the two index arrays are split by a slice, so (numpy's rule) the
    # indexed dims come first: the update is [..., K, H] (scales [..., K]), x as it is.
    if kind == "int8":
        q, s = quantize_int8(x)  # [..., K, H], [..., K]
        return (pages.at[layer, :, page, slot].set(q, mode="drop"),
                scales.at[layer, :, page, slot].set(s, mode="drop"))
    if kind == "fp8":
        return pages.at[layer, :, page, slot].set(quantize_fp8(x, scales[layer]), mode="drop"), scales
    return pages.at[layer, :, page, slot].set(x.astype(pages.dtype), mode="drop"), scales

