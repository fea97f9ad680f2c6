"""Where each of our weights lives in a checkpoint format, and how to turn it into our layout.

Checkpoints store projections as [out, in] matrices (HF and GGUF alike, as numpy reads them); ours are
einsum-ready ([D, N, H] for wq, [N, H, D] for wo, ...) and stacked over the layers ([L, D, N, H]). One map per
format: the Params pytree with a SourceTensor at every leaf, built from the format's names; a layer field's
SourceTensor names its L stored tensors, and `assemble` converts them one by one into the rows of one stacked
host array (no per-layer copies kept, no second stacked copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxinfer import model, sharding
from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str  # a layer field's has "{i}" for the layer index
    shape: tuple[int, ...]  # as the file stores it (each layer's): [out, in] for projections
    to_ours: Callable[[np.ndarray], np.ndarray]
    num_layers: int | None = None  # a layer field: stacked from names(), layer i from name.format(i=i)

    def names(self) -> list[str]:
        """The stored tensors this leaf is made of, in order."""
        if self.num_layers is None:
            return [self.name]
        return [self.name.format(i=i) for i in range(self.num_layers)]


def assemble(entry: SourceTensor, read: Callable[[str], np.ndarray], dtype) -> np.ndarray:
    """entry's tensor in our layout and `dtype` on the host: one stored tensor converted, or the L layers'
    converted into the rows of one preallocated [L, ...] array, each layer read and freed in turn."""
    if entry.num_layers is None:
        return np.asarray(entry.to_ours(read(entry.name)), dtype=dtype)
    out = None
    for i, name in enumerate(entry.names()):
        layer = entry.to_ours(read(name))
        if out is None:
            out = np.empty((entry.num_layers, *layer.shape), dtype=dtype)
        out[i] = layer
    return out


def is_source_tensor(x) -> bool:
    return isinstance(x, SourceTensor)


def source_leaves(tensor_map: model.Params) -> tuple[list[SourceTensor], jax.tree_util.PyTreeDef]:
    return jax.tree.flatten(tensor_map, is_leaf=is_source_tensor)


def placements(cfg: ModelConfig, mesh: Mesh | None, count: int) -> list[NamedSharding | None]:
    """Where each of the `count` leaves goes: its shards on the mesh, or None (the default device)."""
    return [None] * count if mesh is None else jax.tree.leaves(sharding.param_shardings(cfg, mesh))


def place(ours: np.ndarray, cfg: ModelConfig, target: NamedSharding | None) -> jax.Array:
    """One converted tensor, cast to cfg's dtype, onto the default device or straight onto its shards."""
    if target is None:
        return jnp.asarray(ours, dtype=cfg.jnp_dtype)
    return sharding.put(np.asarray(ours, dtype=cfg.jnp_dtype), target)


def load_entry(entry: SourceTensor, read: Callable[[str], np.ndarray], cfg: ModelConfig, target) -> jax.Array:
    """assemble, then place: one leaf of Params from the file onto its device or shards."""
    return place(assemble(entry, read, cfg.jnp_dtype), cfg, target)


def tensor_map(cfg: ModelConfig, names: dict[str, str], qk_to_ours=None) -> model.Params:
    """names: our field -> the format's tensor name ("{i}" stands for the layer index); layer fields are stacked.

    qk_to_ours(n) -> a function from the stored [n * H, D] q or k rows to ours [D, n, H]; the default is a
    plain transpose (HF); GGUF's llama converter permutes the rows and passes its own.
    """
    D, F, N, K, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size

    def heads(n):  # [n * H, D] (out, in) -> ours [D, n, H]
        return lambda w: w.T.reshape(D, n, H)

    def bias(n):  # [n * H] -> [n, H]
        return lambda b: b.reshape(n, H)

    def same(w):
        return w

    def transposed(w):
        return w.T

    qk = qk_to_ours or heads

    def layers() -> model.Layer:
        def t(field, shape, to_ours):
            return SourceTensor(names[field], shape, to_ours, num_layers=cfg.num_layers)

        return model.Layer(
            attn_norm=t("attn_norm", (D,), same),
            wq=t("wq", (N * H, D), qk(N)),
            wk=t("wk", (K * H, D), qk(K)),
            wv=t("wv", (K * H, D), heads(K)),
            bq=t("bq", (N * H,), bias(N)) if cfg.qkv_bias else None,
            bk=t("bk", (K * H,), bias(K)) if cfg.qkv_bias else None,
            bv=t("bv", (K * H,), bias(K)) if cfg.qkv_bias else None,
            wo=t("wo", (D, N * H), lambda w: w.T.reshape(N, H, D)),
            mlp_norm=t("mlp_norm", (D,), same),
            w_gate=t("w_gate", (F, D), transposed),
            w_up=t("w_up", (F, D), transposed),
            w_down=t("w_down", (D, F), transposed),
        )

    return model.Params(
        embed=SourceTensor(names["embed"], (V, D), same),
        layers=layers(),
        final_norm=SourceTensor(names["final_norm"], (D,), same),
        lm_head=None if cfg.tie_embeddings else SourceTensor(names["lm_head"], (V, D), transposed),
    )
