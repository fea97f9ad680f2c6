"""Tensor parallelism: the device mesh, one logical-axis rules table, and the Megatron layout under shard_map.

Every weight is declared once in model.param_specs with logical axes; RULES maps those names to mesh axes and
everything here (PartitionSpecs, NamedShardings, shard_map specs, local-shape checks) is derived from it.

The layout (Megatron-LM), per device of the `tp` axis:
- wq/wk/wv (and their biases) hold this device's heads, w_gate/w_up its columns of F: column-parallel.
- wo holds the rows of its heads, w_down the rows of its F: row-parallel, so each block ends in partial sums,
  and model.forward_hidden adds exactly one psum after attention and one after the MLP per layer.
- The KV cache holds the kv heads of this device's q heads.
- embed and lm_head hold this device's slice of the vocabulary: the lookup is masked and psum'd (one more
  all-reduce per step), and logits come out sharded over V, never gathered. Greedy sampling takes a local
  max/argmax and reduces across shards with a pmax and a pmin on [B]; top-k/top-p/min-p rows all-gather the
  [B, V] logits (only when such a row is in the batch), then every device draws the same token.

kv_heads < tp (SmolLM2's 3 kv heads on 9 devices, K=2 on 4): a kv head cannot be split, so wk/wv/bk/bv stay
replicated (every device holds all K heads: K/1 times the one head it uses, D*K*H*2 extra elements per
layer) and each device slices out the kv head its q heads read. The cache stores tp heads, head j a copy of
kv head j // (tp // K): each device caches one kv head, the same per device as K = tp, but the cache over the
whole mesh is tp / K times the unsharded one. Params keep their checkpoint layout, so they save and restore
as they are, onto any mesh.

Room for data parallelism: the mesh has a `dp` axis (size 1 for now) that no rule uses yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import kv_cache, model, quant
from jaxinfer import sampling as sampling_lib
from jaxinfer.config import ModelConfig
from jaxinfer.runtime import DEFAULT as DEFAULT_RUNTIME
from jaxinfer.runtime import Runtime

DP, TP = "dp", "tp"

# Logical axis -> mesh axis (None: replicated). The one table: model code names only the left column.
RULES: dict[str, str | None] = {
    "layers": None,  # the stacked layer axis the decoder scans over: every device holds every layer
    "vocab": TP,
    "embed": None,
    "heads": TP,
    "kv_heads": TP,  # replicated instead when kv_heads < tp, see the module docstring
    "head_dim": None,
    "ffn": TP,
    "cache_kv_heads": TP,  # the cache's kv-head axis: always tp-sharded (kv heads repeated up to tp)
    "pages": None,
    "page_slots": None,
}
CACHE_PAGE_AXES = ("layers", "cache_kv_heads", "pages", "page_slots", "head_dim")  # k/v_pages [L, K, P, page_size, H]
CACHE_SCALE_AXES = {  # a quantized cache's k/v_scales, split with the pages' kv heads
    "int8": ("layers", "cache_kv_heads", "pages", "page_slots"),  # [L, K, P, page_size]: one per K/V vector
    "fp8": ("layers",),  # [L]: one per layer
}


def make_mesh(tensor_parallel: int, devices=None) -> Mesh:
    """A (dp=1, tp=tensor_parallel) mesh over the first tensor_parallel of `devices` (default: every device of
    every process, so a multi-host run spans all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    if not (isinstance(tensor_parallel, int) and not isinstance(tensor_parallel, bool) and tensor_parallel >= 1):
        raise ValueError(f"tensor_parallel={tensor_parallel!r} must be a positive int")
    if tensor_parallel > len(devices):
        raise ValueError(f"tensor_parallel={tensor_parallel} exceeds the {len(devices)} available devices")
    return Mesh(np.array(devices[:tensor_parallel]).reshape(1, tensor_parallel), (DP, TP))


def tp_size(mesh: Mesh) -> int:
    return mesh.shape[TP]


def check_tensor_parallel(cfg: ModelConfig, tensor_parallel: int) -> None:
    """ValueError naming tensor_parallel unless the Megatron layout splits this config evenly."""
    tp = tensor_parallel
    for name in ("num_heads", "ffn_dim", "vocab_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"tensor_parallel={tp} must divide {name}={getattr(cfg, name)}")
    K = cfg.num_kv_heads
    if K % tp and tp % K:
        raise ValueError(
            f"tensor_parallel={tp} and num_kv_heads={K}: one must divide the other "
            "(split the kv heads, or replicate each to tensor_parallel // num_kv_heads devices)"
        )


def cache_kv_heads(cfg: ModelConfig, tensor_parallel: int) -> int:
    """kv heads the cache stores: K, or tp when K < tp (each kv head repeated tp // K times)."""
    return max(cfg.num_kv_heads, tensor_parallel)


# ---------------------------------------------------------------------------------------------
# Shardings, derived from the TensorSpec declarations


def _pspec(spec: model.TensorSpec, tp: int) -> P:
    """Each dim's mesh axis from RULES; a dim the mesh axis does not divide (only kv_heads < tp) stays replicated."""
    axes = [RULES[name] for name in spec.axes]
    return P(*(a if a is None or size % tp == 0 else None for a, size in zip(axes, spec.shape)))


def param_pspecs(cfg: ModelConfig, tensor_parallel: int) -> model.Params:
    """The Params pytree with a PartitionSpec at every leaf (float weights)."""
    return jax.tree.map(lambda s: _pspec(s, tensor_parallel), model.param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, model.TensorSpec))


def weight_pspec(spec: model.TensorSpec, leaf, tp: int, name: str = "a weight"):
    """The PartitionSpec of one leaf declared by spec: a float array's, or a QuantArray of PartitionSpecs, one per
    part, each on the logical axes its dims hold (quant.QuantArray: [*lead, *out, n], n along the contraction).
    A leaf one dim short of spec is one layer of a stacked spec. A split that would cut a quantization block
    (the contraction axis sharded into pieces that are not whole blocks) is refused by name."""
    if leaf is not None and len(leaf.shape) == len(spec.shape) - 1:
        spec = model.TensorSpec(spec.shape[1:], spec.axes[1:], spec.init, spec.geometry)
    if not quant.is_quant(leaf):
        return _pspec(spec, tp)
    lead = len(spec.shape) - len(leaf.shape[leaf.lead_ndim:])
    own = spec.axes[lead:]
    n = spec.geometry.contract_ndim
    out_axes, contract_axes = (own[n:], own[:n]) if spec.geometry.contract_first else (own[:-n], own[-n:])
    axes = (*spec.axes[:lead], *out_axes, contract_axes[0])
    if RULES[contract_axes[0]] is not None and tp > 1:
        layout = leaf.spec
        if leaf.contraction % tp or (leaf.contraction // tp) % layout.multiple:
            raise ValueError(
                f"tensor_parallel={tp} would split the {layout.multiple}-wide blocks of {name} ({layout.name}): its "
                f"contraction axis of {leaf.contraction} must split into multiples of {layout.multiple}")

    def part_spec(part) -> P:
        return P(*(RULES[a] if RULES[a] is not None and size % tp == 0 else None for a, size in zip(axes, part.shape)))

    return leaf.map_parts(part_spec)


def pspecs_like(params: model.Params, cfg: ModelConfig, tensor_parallel: int) -> model.Params:
    """The PartitionSpecs of `params` as they are: stacked or per layer (each spec without the leading layer
    axis), float or quantized leaves (weight_pspec)."""
    specs = model.param_specs(cfg)
    if model.layout_of(params) == "unrolled":
        specs = dataclasses.replace(specs, layers=tuple(specs.layers for _ in params.layers))
    names = leaf_names(params)
    flat_params, treedef = jax.tree.flatten(params, is_leaf=quant.is_quant)
    flat_specs = treedef.flatten_up_to(specs)
    return jax.tree.unflatten(treedef, [weight_pspec(s, leaf, tensor_parallel, n)
                                        for s, leaf, n in zip(flat_specs, flat_params, names)])


def leaf_names(params: model.Params) -> list[str]:
    """"layers.wq", ... for each leaf of params (a QuantArray is one leaf), in pytree order."""
    paths, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quant)
    return [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in paths]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> model.Params:
    """The Params pytree with a NamedSharding at every leaf (load_orbax's `shardings=`, loaders' placement)."""
    check_tensor_parallel(cfg, tp_size(mesh))
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_pspecs(cfg, tp_size(mesh)))


def _cache_pspecs(kv_cache_dtype: str | None = None) -> kv_cache.KVCache:
    pages = P(*(RULES[a] for a in CACHE_PAGE_AXES))
    scales = None if kv_cache_dtype is None else P(*(RULES[a] for a in CACHE_SCALE_AXES[kv_cache_dtype]))
    return kv_cache.KVCache(k_pages=pages, v_pages=pages, page_table=P(), lengths=P(), k_scales=scales,
                            v_scales=scales)


def cache_shardings(mesh: Mesh, kv_cache_dtype: str | None = None) -> kv_cache.KVCache:
    """The KVCache pytree with a NamedSharding at every leaf: pages (and int8 scales) split by kv head, page table
    replicated."""
    return jax.tree.map(lambda p: NamedSharding(mesh, p), _cache_pspecs(kv_cache_dtype))


def vocab_split(mesh: Mesh) -> NamedSharding:
    """[B, V] arrays split over the vocabulary, as logits come out of `logits` on a mesh."""
    return NamedSharding(mesh, P(None, TP))


# ---------------------------------------------------------------------------------------------
# Placement


def put(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One host tensor onto the mesh: each device receives only its own slice (every process passes the same a)."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh, quantize: str = "none") -> model.Params:
    """model.init_params generated in place on the mesh (threefry is partitionable: the same values as tp=1)."""
    check_tensor_parallel(cfg, tp_size(mesh))
    pspecs = pspecs_like(model.abstract_params(cfg, quantize), cfg, tp_size(mesh))
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), pspecs)
    init = jax.jit(model.init_params, static_argnums=(0, 2, 3), out_shardings=shardings)
    return init(cfg, key, 0.02, quantize)


def init_cache(cfg: ModelConfig, mesh: Mesh, kv_cache_dtype: str | None = None, **sizes) -> kv_cache.KVCache:
    """kv_cache.init_cache with the kv heads repeated up to tp, created in place on the mesh."""
    return _cache_initializer(cfg, mesh, tuple(sorted(sizes.items())), kv_cache_dtype)()


@functools.lru_cache(maxsize=32)
def _cache_initializer(cfg: ModelConfig, mesh: Mesh, sizes: tuple, kv_cache_dtype: str | None):
    stored = cfg.replace(num_kv_heads=cache_kv_heads(cfg, tp_size(mesh)))
    return jax.jit(lambda: kv_cache.init_cache(stored, **dict(sizes), kv_cache_dtype=kv_cache_dtype),
                   out_shardings=cache_shardings(mesh, kv_cache_dtype))


# ---------------------------------------------------------------------------------------------
# shard_map wrappers: model and sampling code run on local shards; mesh=None is the unsharded path, unchanged


def _local_params(params: model.Params, cfg: ModelConfig, tp: int) -> model.Params:
    """Inside shard_map: check the local shapes; with kv_heads < tp keep only the kv head this device's q heads read."""
    D, V = cfg.d_model, cfg.vocab_size
    assert params.embed.shape == (V // tp, D), params.embed.shape
    assert params.lm_head is None or params.lm_head.shape == (D, V // tp), params.lm_head.shape
    own = None if cfg.num_kv_heads >= tp else jax.lax.axis_index(TP) // (tp // cfg.num_kv_heads)
    if model.layout_of(params) == "scanned":
        layers = _local_layer(params.layers, cfg, tp, own, (cfg.num_layers,))
    else:
        layers = tuple(_local_layer(layer, cfg, tp, own, ()) for layer in params.layers)
    return dataclasses.replace(params, layers=layers)


def _local_layer(layer: model.Layer, cfg: ModelConfig, tp: int, own, lead: tuple[int, ...]) -> model.Layer:
    """One Layer's local shards (lead: (L,) for the stacked fields, () for one layer's). own: None, or the kv head
    this device's q heads read when kv_heads < tp (device d serves q heads [d N/tp, (d+1) N/tp): all read kv head
    d // (tp // K))."""
    D, F, N, K, H = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert layer.wq.shape == (*lead, D, N // tp, H), layer.wq.shape
    assert layer.wo.shape == (*lead, N // tp, H, D), layer.wo.shape
    assert layer.w_gate.shape == layer.w_up.shape == (*lead, D, F // tp)
    assert layer.w_down.shape == (*lead, F // tp, D), layer.w_down.shape
    if own is not None:
        assert layer.wk.shape == (*lead, D, K, H), layer.wk.shape
        kv_axis = len(lead) + 1  # wk/wv [..., D, K, H]; bk/bv [..., K, H]

        def take(w, axis):
            if quant.is_quant(w):
                return w.map_parts(lambda p: jax.lax.dynamic_slice_in_dim(p, own, 1, w.storage_axis(axis)))
            return None if w is None else jax.lax.dynamic_slice_in_dim(w, own, 1, axis)

        layer = dataclasses.replace(
            layer, wk=take(layer.wk, kv_axis), wv=take(layer.wv, kv_axis), bk=take(layer.bk, kv_axis - 1),
            bv=take(layer.bv, kv_axis - 1),
        )
    assert layer.wk.shape == (*lead, D, max(K // tp, 1), H), layer.wk.shape
    return layer


def _collective_axis(mesh: Mesh) -> str | None:
    """TP, or None on a 1-device tp axis: XLA keeps even a 1-device all-reduce, and there is nothing to sum."""
    return TP if tp_size(mesh) > 1 else None


def forward_hidden(params, cfg, tokens, positions, cache, seq_ids, *, runtime: Runtime = DEFAULT_RUNTIME):
    """model.forward_hidden, run on each device's shard of params and cache when runtime.mesh is not None."""
    (hidden,), cache = forward_rows(params, cfg, (model.Rows(tokens, positions, seq_ids),), cache, runtime=runtime)
    return hidden, cache


def forward_rows(params, cfg, rows, cache, *, runtime: Runtime = DEFAULT_RUNTIME):
    """model.forward_rows (several groups of rows in one forward) on runtime's mesh, as forward_hidden."""
    mesh = runtime.mesh
    if mesh is None:
        return model.forward_rows(params, cfg, rows, cache, runtime=runtime)
    tp = tp_size(mesh)

    def local(params, rows, cache):
        return model.forward_rows(
            _local_params(params, cfg, tp), cfg, rows, cache, runtime=runtime, tp_axis=_collective_axis(mesh)
        )

    cache_specs = _cache_pspecs(cache.kv_cache_dtype)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(pspecs_like(params, cfg, tp), P(), cache_specs),
        out_specs=(P(), cache_specs),  # hidden states are whole on every device after the last psum
        check_vma=tp > 1,  # without psums (tp=1) the check cannot see that one device's values are replicated
    )(params, rows, cache)


def logits(params, cfg, hidden, *, runtime: Runtime = DEFAULT_RUNTIME):
    """model.logits: hidden [..., D] -> [..., V] float32, split over the vocabulary (never gathered) on runtime's
    mesh."""
    mesh, matmul = runtime.mesh, runtime.quantized_matmul
    if mesh is None:
        return model.logits(params, cfg, hidden, matmul)
    vocab_split = P(*([None] * (hidden.ndim - 1)), TP)
    return jax.shard_map(
        lambda params, hidden: model.logits(params, cfg, hidden, matmul),
        mesh=mesh,
        in_specs=(pspecs_like(params, cfg, tp_size(mesh)), P()),
        out_specs=vocab_split,
    )(params, hidden)


def forward(params, cfg, tokens, positions, cache, seq_ids, *, runtime: Runtime = DEFAULT_RUNTIME):
    """model.forward on runtime's mesh: tokens [B, T] -> (logits [B, T, V] float32 split over V, cache)."""
    hidden, cache = forward_hidden(params, cfg, tokens, positions, cache, seq_ids, runtime=runtime)
    return logits(params, cfg, hidden, runtime=runtime), cache


def sample(logits, arrays, keys, seen, *, mesh: Mesh | None = None):
    """sampling.sample on vocab-split logits [B, V] and seen [B, V]: one token per row, the same on every device."""
    if mesh is None:
        return sampling_lib.sample(logits, arrays, keys, seen)
    vocab_split = P(None, TP)
    return jax.shard_map(
        functools.partial(sampling_lib.sample, vocab_axis=_collective_axis(mesh)),
        mesh=mesh,
        in_specs=(vocab_split, P(), P(), vocab_split),
        out_specs=P(),
        # Tokens drawn from all-gathered logits are equal on every device, which vma typing cannot see.
        check_vma=False,
    )(logits, arrays, keys, seen)


def logprobs(logits, tokens, k: int, *, mesh: Mesh | None = None):
    """sampling.logprobs on vocab-split logits [B, V] and tokens [B]: (token_logprob [B], top_ids [B, k],
    top_logprobs [B, k]), the same on every device."""
    if mesh is None:
        return sampling_lib.logprobs(logits, tokens, k)
    return jax.shard_map(
        functools.partial(sampling_lib.logprobs, k=k, vocab_axis=_collective_axis(mesh)),
        mesh=mesh,
        in_specs=(P(None, TP), P()),
        out_specs=(P(), P(), P()),
        # psum'd and all-gathered: equal on every device, which vma typing cannot see of the gathered top-k.
        check_vma=False,
    )(logits, tokens)


def hlo_collectives(compiled_text: str) -> dict[str, int]:
    """Counts of each collective op in a compiled HLO module's text (tests and run_sharded.py)."""
    ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    counts = {}
    for op in ops:
        # "= f32[...] all-reduce(" and async pairs "all-reduce-start(": count each collective once.
        counts[op] = sum(f" {op}(" in line or f" {op}-start(" in line for line in compiled_text.splitlines())
    return counts


def to_mesh(params: model.Params, cfg: ModelConfig, mesh: Mesh) -> model.Params:
    """Reshard existing params (either layout) onto a mesh (another mesh size, or from one device), tensor by tensor."""
    check_tensor_parallel(cfg, tp_size(mesh))
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), pspecs_like(params, cfg, tp_size(mesh)))
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


def place_weight(host, spec: model.TensorSpec, mesh: Mesh, name: str = "a weight"):
    """One host weight (numpy array, or QuantArray of numpy parts) straight onto its shards."""
    pspec = weight_pspec(spec, host, tp_size(mesh), name)
    if quant.is_quant(host):
        return dataclasses.replace(host, parts={k: put(v, NamedSharding(mesh, pspec.parts[k]))
                                                for k, v in host.parts.items()})
    return put(host, NamedSharding(mesh, pspec))

