"""HF checkpoint directories: config.json + *.safetensors (one file, or sharded with an index).

Every tensor is checked (present, expected shape, nothing unexpected) before any is converted, so a
bad checkpoint raises one error naming the file and every offending tensor and never half-loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model
from jaxinfer.checkpoints.safetensors_file import SafetensorsFile
from jaxinfer.config import ModelConfig

_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]  # as HF stores it: [out, in] for projections
    to_ours: Callable[[np.ndarray], np.ndarray]


def hf_tensor_map(cfg: ModelConfig) -> model.Params:
    """The Params pytree with (HF name, HF shape, HF -> our layout) at every leaf."""
    D, F, N, K, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size

    def heads(n):  # HF [n * H, D] (out, in) -> ours [D, n, H]
        return lambda w: w.T.reshape(D, n, H)

    def bias(n):  # [n * H] -> [n, H]
        return lambda b: b.reshape(n, H)

    def same(w):
        return w

    def transposed(w):
        return w.T

    def layer(i: int) -> model.Layer:
        p = f"model.layers.{i}."
        attn_bias = cfg.qkv_bias
        return model.Layer(
            attn_norm=HFTensor(p + "input_layernorm.weight", (D,), same),
            wq=HFTensor(p + "self_attn.q_proj.weight", (N * H, D), heads(N)),
            wk=HFTensor(p + "self_attn.k_proj.weight", (K * H, D), heads(K)),
            wv=HFTensor(p + "self_attn.v_proj.weight", (K * H, D), heads(K)),
            bq=HFTensor(p + "self_attn.q_proj.bias", (N * H,), bias(N)) if attn_bias else None,
            bk=HFTensor(p + "self_attn.k_proj.bias", (K * H,), bias(K)) if attn_bias else None,
            bv=HFTensor(p + "self_attn.v_proj.bias", (K * H,), bias(K)) if attn_bias else None,
            wo=HFTensor(p + "self_attn.o_proj.weight", (D, N * H), lambda w: w.T.reshape(N, H, D)),
            mlp_norm=HFTensor(p + "post_attention_layernorm.weight", (D,), same),
            w_gate=HFTensor(p + "mlp.gate_proj.weight", (F, D), transposed),
            w_up=HFTensor(p + "mlp.up_proj.weight", (F, D), transposed),
            w_down=HFTensor(p + "mlp.down_proj.weight", (D, F), transposed),
        )

    return model.Params(
        embed=HFTensor("model.embed_tokens.weight", (V, D), same),
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=HFTensor("model.norm.weight", (D,), same),
        lm_head=None if cfg.tie_embeddings else HFTensor("lm_head.weight", (V, D), transposed),
    )


def _is_entry(x) -> bool:
    return isinstance(x, HFTensor)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only pickled weights {pickles}: pickles can run code when loaded and are refused; "
                "convert them to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))"
            )
        raise ValueError(f"{path} has no *.safetensors files")
    return files


def load_hf(path: str | Path, dtype: str | None = None, progress=None) -> tuple[ModelConfig, model.Params]:
    """progress(done, total) is called after each tensor is converted, if given."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a HF checkpoint directory: no config.json")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()), dtype=dtype)

    files = [SafetensorsFile(f) for f in _safetensors_files(path)]
    where = {name: f for f in files for name in f.tensors}
    tensor_map = hf_tensor_map(cfg)
    entries = jax.tree.leaves(tensor_map, is_leaf=_is_entry)
    expected = {e.name for e in entries}
    problems = []
    for name, shape in ((e.name, e.shape) for e in entries):
        if name not in where:
            problems.append(f"missing tensor {name}")
        elif where[name].shape(name) != shape:
            problems.append(f"{where[name].path.name}: tensor {name} has shape {where[name].shape(name)}, expected {shape}")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name in sorted(set(where) - expected - tolerated):
        if not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"{where[name].path.name}: unexpected tensor {name}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems))

    treedef = jax.tree.structure(tensor_map, is_leaf=_is_entry)
    arrays = []
    for entry in entries:
        arrays.append(jnp.asarray(entry.to_ours(np.asarray(where[entry.name].read(entry.name))), dtype=cfg.jnp_dtype))
        if progress:
            progress(len(arrays), len(entries))
    return cfg, jax.tree.unflatten(treedef, arrays)
