"""Where each of our weights lives in a checkpoint format, and how to turn it into our layout.

Checkpoints store projections as [out, in] matrices (HF and GGUF alike, as numpy reads them); ours are
einsum-ready ([D, N, H] for wq, [N, H, D] for wo, ...). One map per format: the Params pytree with a
SourceTensor at every leaf, built from the format's names.
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
    name: str
    shape: tuple[int, ...]  # as the file stores it: [out, in] for projections
    to_ours: Callable[[np.ndarray], np.ndarray]


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


def tensor_map(cfg: ModelConfig, names: dict[str, str], qk_to_ours=None) -> model.Params:
    """names: our field -> the format's tensor name ("{i}" stands for the layer index).

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

    def layer(i: int) -> model.Layer:
        def t(field, shape, to_ours):
            return SourceTensor(names[field].format(i=i), shape, to_ours)

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
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=SourceTensor(names["final_norm"], (D,), same),
        lm_head=None if cfg.tie_embeddings else SourceTensor(names["lm_head"], (V, D), transposed),
    )
