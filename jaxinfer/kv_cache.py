"""The paged KV cache: a preallocated pytree passed into every step and returned updated (donated under jit).

One pool of pages per layer, the layers stacked on a leading axis (the decoder scans over it); each sequence owns
a row of the page table. Which pages a sequence gets is
decided host side (jaxinfer/page_allocator.py); this file only writes K/V into the pool. Reads belong to
attention: the reference gathers pages (`pallas_kernels.reference.gather_pages`), the kernels follow the table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k_pages: jax.Array  # [L, K, P, page_size, H]
    v_pages: jax.Array  # [L, K, P, page_size, H]
    page_table: jax.Array  # [max_seqs, pages_per_seq] int32: page of each block of page_size positions
    lengths: jax.Array  # [max_seqs] int32: tokens already written per sequence

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


def init_cache(
    cfg: ModelConfig, *, num_pages: int, page_size: int, max_seqs: int, pages_per_seq: int, dtype=None
) -> KVCache:
    """An empty pool. Unused slots hold zeros; nothing reads a slot at or past a sequence's length."""
    for name, value in (("num_pages", num_pages), ("page_size", page_size), ("max_seqs", max_seqs),
                        ("pages_per_seq", pages_per_seq)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int")
    shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)  # [L, K, P, page_size, H]
    dtype = dtype or cfg.jnp_dtype
    return KVCache(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        page_table=jnp.zeros((max_seqs, pages_per_seq), jnp.int32),
        lengths=jnp.zeros((max_seqs,), jnp.int32),
    )


def page_addresses(page_table: jax.Array, positions: jax.Array, num_pages: int, page_size: int):
    """page_table [B, pages_per_seq], positions [B, T] -> (page [B, T], slot [B, T]).

    Padding (position -1) gets page index num_pages: out of bounds, so a scatter with mode="drop" skips it.
    """
    safe = jnp.maximum(positions, 0)
    page = jnp.take_along_axis(page_table, safe // page_size, axis=1)  # [B, T]
    page = jnp.where(positions >= 0, page, num_pages)
    return page, safe % page_size


def write(
    k_pages: jax.Array,  # [L, K, P, page_size, H]
    v_pages: jax.Array,  # [L, K, P, page_size, H]
    k: jax.Array,  # [B, T, K, H]
    v: jax.Array,  # [B, T, K, H]
    page_table: jax.Array,  # [B, pages_per_seq] rows of the sequences in this batch
    positions: jax.Array,  # [B, T], -1 for padding
    layer: jax.Array | int,  # [] the layer whose pool is written (traced inside the layer scan)
) -> tuple[jax.Array, jax.Array]:
    """Scatter this chunk's K/V into layer `layer`'s (page, slot) addresses; padding writes nothing."""
    _, _, num_pages, page_size, _ = k_pages.shape
    page, slot = page_addresses(page_table, positions, num_pages, page_size)
    return write_at(k_pages, v_pages, k, v, page, slot, layer)


def write_at(k_pages, v_pages, k, v, page, slot, layer):
    """k, v [..., K, H] into layer `layer` at page_addresses' (page, slot) [...] (page num_pages: dropped).

    One scatter into the whole stacked pool (in place under donation), never a copy of the layer's slice."""
    # [layer, :, page, slot]: the scalar and the two index arrays are split by a slice, so (numpy's rule) the
    # indexed dims come first: the update is [..., K, H], k as it is.
    k_pages = k_pages.at[layer, :, page, slot].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[layer, :, page, slot].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages
