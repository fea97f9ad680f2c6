"""Where each of our weights lives in a checkpoint format, and how to turn it into our layout.

Checkpoints store projections as [out, in] matrices (HF and GGUF alike, as numpy reads them); ours are
einsum-ready ([D, N, H] for wq, [N, H, D] for wo, ...) and stacked over the layers ([L, D, N, H]). One map per
format: the Params pytree with a SourceTensor at every leaf, built from the format's names; a layer field's
SourceTensor names its L stored tensors, and `assemble` converts them one by one into the rows of one stacked
host array (no per-layer copies kept, no second stacked copy).

A quantized projection (jaxinfer.quant) keeps the checkpoint's [out, in] order, its out rows reshaped (and, for
GGUF's llama q/k, permuted) by the SourceTensor's `rows`: `load_weight` keeps a file's blocks where a quant layout
holds them exactly, quantizes float tensors when asked, and converts one layer at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model, quant, sharding
from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str  # a layer field's has "{i}" for the layer index
    shape: tuple[int, ...]  # as the file stores it (each layer's): [out, in] for projections
    to_ours: Callable[[np.ndarray], np.ndarray]
    num_layers: int | None = None  # a layer field: stacked from names(), layer i from name.format(i=i)
    rows: Callable[[np.ndarray], np.ndarray] | None = None  # a projection's: stored [out rows, n] -> [*out, n]
    spec: model.TensorSpec | None = None  # our declaration of the leaf (shape, axes, geometry)

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


def tensor_map(cfg: ModelConfig, names: dict[str, str], qk_rows=None) -> model.Params:
    """names: our field -> the format's tensor name ("{i}" stands for the layer index); layer fields are stacked.

    qk_rows(n) -> a function from the stored q or k rows [n * H, X] to [n, H, X] (X: D floats, or a quantized
    tensor's parts); the default reshapes (HF); GGUF's llama converter permutes the rows and passes its own.
    """
    D, F, N, K, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size

    def heads(n):  # [n * H, X] (out, in) -> [n, H, X]
        return lambda w: w.reshape(n, H, w.shape[-1])

    def bias(n):  # [n * H] -> [n, H]
        return lambda b: b.reshape(n, H)

    def same(w):
        return w

    def transposed(w):
        return w.T

    qk = qk_rows or heads

    def layers() -> model.Layer:
        def t(field, shape, to_ours, rows=None):
            return SourceTensor(names[field], shape, to_ours, num_layers=cfg.num_layers, rows=rows)

        def projection(field, shape, rows, to_ours_from_rows):
            return t(field, shape, lambda w: to_ours_from_rows(rows(w)), rows)

        def in_last(w):  # [*out, D] -> [D, *out]
            return np.moveaxis(w, -1, 0)

        return model.Layer(
            attn_norm=t("attn_norm", (D,), same),
            wq=projection("wq", (N * H, D), qk(N), in_last),
            wk=projection("wk", (K * H, D), qk(K), in_last),
            wv=projection("wv", (K * H, D), heads(K), in_last),
            bq=t("bq", (N * H,), bias(N)) if cfg.qkv_bias else None,
            bk=t("bk", (K * H,), bias(K)) if cfg.qkv_bias else None,
            bv=t("bv", (K * H,), bias(K)) if cfg.qkv_bias else None,
            wo=projection("wo", (D, N * H), same, lambda w: w.T.reshape(N, H, D)),
            mlp_norm=t("mlp_norm", (D,), same),
            w_gate=projection("w_gate", (F, D), same, transposed),
            w_up=projection("w_up", (F, D), same, transposed),
            w_down=projection("w_down", (D, F), same, transposed),
        )

    tensors = model.Params(
        embed=SourceTensor(names["embed"], (V, D), same, rows=same),
        layers=layers(),
        final_norm=SourceTensor(names["final_norm"], (D,), same),
        lm_head=None if cfg.tie_embeddings else SourceTensor(names["lm_head"], (V, D), transposed, rows=same),
    )
    entries, treedef = source_leaves(tensors)
    specs = treedef.flatten_up_to(model.param_specs(cfg))
    return jax.tree.unflatten(treedef, [dataclasses.replace(e, spec=s) for e, s in zip(entries, specs)])


# ---------------------------------------------------------------------------------------------
# Quantized weights


def plan_layout(entry: SourceTensor, quantize: str, kept_layout: str | None) -> str | None:
    """The quant layout one stored tensor of entry is held in, or None for float.

    kept_layout: the layout that holds the stored tensor's own blocks exactly (GGUF), None for a float tensor.
    "none": float; "auto": the file's own blocks, floats stay float; a mode (quant.MODES): every projection in
    that layout, kept as stored if it already is, else quantized from its float values."""
    if entry.rows is None or quantize == "none":
        return None
    return kept_layout if quantize == "auto" else quant.MODES[quantize]


def check_plan(entries: list[SourceTensor], reader: Reader, quantize: str, cfg: ModelConfig, mesh) -> None:
    """Before any tensor is read: the mesh splits the config evenly, and each projection's layout can hold its
    contraction axis, whole blocks on each shard; a ValueError names the weight, the layout and the value."""
    tp = 1 if mesh is None else sharding.tp_size(mesh)
    if mesh is not None:
        sharding.check_tensor_parallel(cfg, tp)
    for e in entries:
        for name in e.names():
            target = plan_layout(e, quantize, reader.kept_layout(name))
            if target is None:
                continue
            _, contracted = e.spec.geometry.split(_own_shape(e))
            what = f"{name} ({target})" if quantize == "auto" else f"quantize={quantize!r} on {name}"
            quant.check_contraction(target, int(np.prod(contracted)), what)
            if tp > 1:
                abstract = quant.abstract(target, _own_shape(e), e.spec.geometry, cfg.dtype)
                sharding.weight_pspec(e.spec, abstract, tp, name)
            if quantize != "auto":
                break  # one layout for every layer


def _own_shape(entry: SourceTensor) -> tuple[int, ...]:
    """Our shape of one stored tensor of entry (one layer's)."""
    return entry.spec.shape[1:] if entry.num_layers else entry.spec.shape


def held_bytes(entries: list[SourceTensor], kept_layout: Callable[[str], str | None], quantize: str,
               cfg: ModelConfig) -> int:
    """Bytes the weights take as load_weight would hold them, from shapes and stored types alone (no data read)."""
    total = 0
    for e in entries:
        own = _own_shape(e)
        for name in e.names():
            target = plan_layout(e, quantize, kept_layout(name))
            if target is None:
                total += int(np.prod(own)) * cfg.jnp_dtype.itemsize
                continue
            total += quant.abstract(target, own, e.spec.geometry, cfg.dtype).nbytes
    return total


@dataclasses.dataclass(frozen=True)
class Reader:
    """What a loader reads a stored tensor with: `float(name)` as float [out, in]; for a file that stores blocks
    (GGUF), `kept_layout(name)`, the quant layout holding them exactly (None: none does, or a float tensor), and
    `kept_parts(name)`, those parts [out rows, n] in the file's row order."""

    float: Callable[[str], np.ndarray]
    kept_layout: Callable[[str], str | None] = lambda name: None
    kept_parts: Callable[[str], dict[str, np.ndarray]] | None = None


def load_weight(entry: SourceTensor, reader: Reader, quantize: str, cfg: ModelConfig, mesh):
    """One leaf of Params from the file onto its device or shards: float (assemble, one preallocated stacked array),
    or a QuantArray, stacked over the layers when every layer is held in one layout, else a list of per-layer
    QuantArrays (for the unrolled layout: params_from_leaves)."""
    names = entry.names()
    targets = [plan_layout(entry, quantize, reader.kept_layout(name)) for name in names]
    if all(t is None for t in targets):
        return _put(assemble(entry, reader.float, cfg.jnp_dtype), entry.spec, names[0], mesh)

    def hold(name: str, target: str | None):
        if target is None:
            return np.asarray(entry.to_ours(reader.float(name)), dtype=cfg.jnp_dtype)
        if reader.kept_layout(name) == target:
            parts = {k: entry.rows(v) for k, v in reader.kept_parts(name).items()}
        else:
            parts = quant.quantize_storage(entry.rows(reader.float(name)), target)
        return quant.from_parts(parts, target, _own_shape(entry), entry.spec.geometry, cfg.dtype)

    held = [hold(name, target) for name, target in zip(names, targets)]
    if entry.num_layers is None:
        return _put(held[0], entry.spec, names[0], mesh)
    if len(set(targets)) > 1:
        return [_put(w, entry.spec, name, mesh) for w, name in zip(held, names)]
    parts = {k: np.stack([w.parts[k] for w in held]) for k in held[0].parts}
    return _put(dataclasses.replace(held[0], parts=parts), entry.spec, names[0], mesh)


def _put(host, spec: model.TensorSpec, name: str, mesh):
    """A host weight onto the default device, or straight onto its shards (name: for a refused split)."""
    if mesh is not None:
        return sharding.place_weight(host, spec, mesh, name)
    if quant.is_quant(host):
        return host.map_parts(jnp.asarray)
    return jnp.asarray(host)


def requantize(params: model.Params, cfg: ModelConfig, quantize: str, mesh) -> model.Params:
    """Params restored as stored (orbax: float, or QuantArrays), held as `quantize` asks, weight by weight:
    "auto" as stored; "none" every QuantArray dequantized to cfg.dtype; a mode every projection in its layout
    (a QuantArray in another layout dequantized first)."""
    if quantize == "auto":
        return params
    specs = jax.tree.structure(params, is_leaf=quant.is_quant).flatten_up_to(model.param_specs(cfg))
    leaves, treedef = jax.tree.flatten(params, is_leaf=quant.is_quant)
    target = quant.MODES.get(quantize)

    def convert(w, spec: model.TensorSpec, name: str):
        layout = w.layout if quant.is_quant(w) else None
        if spec.geometry is None or layout == target:
            return w
        w = np.asarray(quant.dequantize(w))
        lead = 1 if spec.axes[0] == "layers" else 0
        held = w.astype(cfg.jnp_dtype) if target is None else quant.quantize(w, target, spec.geometry, cfg.dtype, lead)
        return _put(held, spec, name, mesh)

    names = sharding.leaf_names(params)
    return jax.tree.unflatten(treedef, [convert(w, s, n) for w, s, n in zip(leaves, specs, names)])


@dataclasses.dataclass
class _PerLayer:
    leaves: list


def params_from_leaves(treedef, leaves: list) -> model.Params:
    """Params from load_weight's leaves: stacked, or unrolled (a tuple of per-layer Layers) when some layer field
    came back as a list (layers held in different layouts, as llama.cpp's mixes such as Q4_K_M store them)."""
    if not any(isinstance(leaf, list) for leaf in leaves):
        return jax.tree.unflatten(treedef, leaves)
    params = jax.tree.unflatten(treedef, [_PerLayer(leaf) if isinstance(leaf, list) else leaf for leaf in leaves])
    columns = {}
    for f in dataclasses.fields(model.Layer):
        value = getattr(params.layers, f.name)
        columns[f.name] = value.leaves if isinstance(value, _PerLayer) else model.unstack_weight(value)
    num_layers = max(len(c) for c in columns.values() if c is not None)
    layers = tuple(model.Layer(**{n: None if c is None else c[i] for n, c in columns.items()})
                   for i in range(num_layers))
    return dataclasses.replace(params, layers=layers)
