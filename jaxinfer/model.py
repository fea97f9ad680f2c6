"""The whole decoder as pure functions: embed -> L x (norm, attention, norm, MLP) -> norm -> logits.

Two layouts of the layer weights, one forward: stacked on a leading layer axis (Layer's fields [L, ...], what the
loaders and orbax produce), run as one `lax.scan` body (one layer traced and compiled once, whatever L is); or a
tuple of L per-layer Layers, unrolled into the program (L copies of the layer: several times the compile time).
The layout is the pytree's structure, so it is static under jit. Unrolled exists because XLA:CPU copies each
layer's slice of the stacked weights out before its matmuls, which made a scanned decode step ~40% slower on
the CPU (profiles/README.md); where the CPU kernels read the weights, the scan body passes them the whole stack and
the layer index instead (layer_at), and scanned is the faster. `layout_for_platform` picks by measurement. The KV
cache is stacked either way.

Einsum letters: B batch, T query length, S key length, D d_model, F ffn, N q heads, K kv heads,
G = N // K, H head_dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention as attn
from jaxinfer import cpu_kernels, kv_cache, quant
from jaxinfer.config import ModelConfig
from jaxinfer.runtime import DEFAULT as DEFAULT_RUNTIME
from jaxinfer.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One declaration per tensor: init, abstract shapes and shardings are derived from it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim; sharding rules map them to mesh axes
    init: str = "normal"  # "normal" | "ones" | "zeros"
    geometry: quant.Geometry | None = None  # how a projection contracts (a weight that may be quantized); else None


# A projection's weight: a float array, or a quant.QuantArray of the same logical shape at its stored precision.
Weight = jax.Array | quant.QuantArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    """One decoder layer's weights; in Params every field carries a leading [L] axis (all layers stacked), and
    the scan body sees one layer's slice, the shapes below."""

    attn_norm: jax.Array  # [D]
    wq: Weight  # [D, N, H]
    wk: Weight  # [D, K, H]
    wv: Weight  # [D, K, H]
    bq: jax.Array | None  # [N, H], qkv_bias only
    bk: jax.Array | None  # [K, H]
    bv: jax.Array | None  # [K, H]
    wo: Weight  # [N, H, D]
    mlp_norm: jax.Array  # [D]
    w_gate: Weight  # [D, F]
    w_up: Weight  # [D, F]
    w_down: Weight  # [F, D]


PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # Layer's Weight fields: the matmuls


def layer_at(layers: Layer, index: jax.Array, matmul: str | None, rows: int) -> Layer:
    """Layer `index` of the stacked layers, as the scan body uses it: each projection a CPU kernel contracts at
    `rows` rows of activations (quant.kernel_reads) stays whole, quant.LayerOf(stack, index), read where it lies;
    every other field is sliced."""

    def field(name: str, stack):
        if name in PROJECTIONS and quant.kernel_reads(stack, matmul, rows):
            return quant.LayerOf(stack, index)
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False), stack)

    return Layer(**{f.name: field(f.name, getattr(layers, f.name)) for f in dataclasses.fields(Layer)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: Weight  # [V, D]
    layers: Layer | tuple[Layer, ...]  # stacked (every field [L, ...]: scanned) or L Layers (unrolled)
    final_norm: jax.Array  # [D]
    lm_head: Weight | None  # [D, V]; None when tied to embed


LAYOUTS = ("scanned", "unrolled")
# Chosen by measurement (profiles/README.md): on the CPU without the kernels the scanned decode step ran ~40% slower
# (XLA:CPU copies each layer's weight slice before its dots); elsewhere scanning, for its compile time.
DEFAULT_LAYOUT = {"cpu": "unrolled"}


# Quantized weights through XLA's dequantize-and-dot: scanned everywhere. Unrolled, XLA:CPU dequantized every layer
# at the start of the program (quant.after ties each layer to its input now), and the scanned int8 / int4 decode
# step ran as fast or faster (profiles/README.md, "Quantized weights").
QUANTIZED_LAYOUT: dict[str, str] = {}
# Through the CPU kernels (jaxinfer.cpu_kernels, where they built; they read quantized and float32 weights):
# scanned. The scan body hands a kernel the whole stack and the layer index (layer_at: a sliced operand of a custom
# call is copied first). Measured on the default model (2026-12-03, interleaved, profiles/probes/cpu_layout_decode.py):
# Q4_1 scanned ran faster than unrolled (generate 128-157 vs 118-123 tok/s, the engine's decode step 10.8-12.5 vs
# 14.8-15.5 ms: 26 arguments to pass a step, not 693) and compiled in about half the time (4.1 vs 7.4 s); float32
# within 3% (37.3 / 37.2 vs 37.8 / 35.8 tok/s; unrolled on XLA's dots 30.3 / 28.6), compiling in 5.7 s vs 9.5.
KERNEL_LAYOUT = {"cpu": "scanned"}


def layout_for_platform(platform: str | None = None, quantized: bool = False, dtype: str = "float32") -> str:
    """The default layout of a model's layers on `platform` (None: jax's default backend); dtype: the float weights'
    (bfloat16 ones go through XLA's dots: unrolled on the CPU)."""
    platform = platform or jax.default_backend()
    if (quantized or dtype == "float32") and platform in KERNEL_LAYOUT and cpu_kernels.available():
        return KERNEL_LAYOUT[platform]
    table = QUANTIZED_LAYOUT if quantized else DEFAULT_LAYOUT
    return table.get(platform, "scanned")


def is_quantized(params: Params) -> bool:
    return any(quant.is_quant(leaf) for leaf in jax.tree.leaves(params, is_leaf=quant.is_quant))


def layout_of(params: Params) -> str:
    return "unrolled" if isinstance(params.layers, tuple) else "scanned"


def with_layout(params: Params, layout: str) -> Params:
    """params with its layers stacked ("scanned") or split into L per-layer Layers ("unrolled"), field by field
    (one field's extra copy at a time; the old arrays are freed when the caller drops `params`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if layout == layout_of(params):
        return params
    names = [f.name for f in dataclasses.fields(Layer)]
    if layout == "unrolled":
        stacked = params.layers
        num_layers = stacked.attn_norm.shape[0]
        columns = {n: [None] * num_layers if getattr(stacked, n) is None else unstack_weight(getattr(stacked, n))
                   for n in names}
        layers = tuple(Layer(**{n: columns[n][i] for n in names}) for i in range(num_layers))
    else:
        layers = Layer(**{n: None if getattr(params.layers[0], n) is None else
                          stack_weight([getattr(layer, n) for layer in params.layers]) for n in names})
    return dataclasses.replace(params, layers=layers)


_unstack = jax.jit(lambda w: tuple(jnp.unstack(w)))  # [L, ...] -> L x [...], one program per shape
_stack = jax.jit(jnp.stack)


def unstack_weight(w: Weight | None) -> list[Weight] | None:
    """A stacked [L, ...] weight (float or quantized) -> its L layers'; None stays None."""
    if w is None:
        return None
    if quant.is_quant(w):
        columns = {k: _unstack(p) for k, p in w.parts.items()}
        return [dataclasses.replace(w, parts={k: c[i] for k, c in columns.items()}) for i in range(w.shape[0])]
    return list(_unstack(w))


def stack_weight(ws: list[Weight]) -> Weight:
    """L per-layer weights, all float or all in one quant layout -> one stacked [L, ...] weight."""
    layouts = {w.layout if quant.is_quant(w) else "float" for w in ws}
    if len(layouts) > 1:
        raise ValueError(f"layers held in different layouts {sorted(layouts)} cannot be stacked for the scanned "
                         "layout; use layout='unrolled'")
    if quant.is_quant(ws[0]):
        return dataclasses.replace(ws[0], parts={k: _stack([w.parts[k] for w in ws]) for k in ws[0].parts})
    return _stack(tuple(ws))


def param_specs(cfg: ModelConfig) -> Params:
    """The Params pytree with a TensorSpec at every leaf; layer weights [L, ...] on the logical axis "layers"."""
    D, F, N, K, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    L, bias = cfg.num_layers, cfg.qkv_bias

    def stacked(shape, axes, init="normal", geometry=None) -> TensorSpec:
        return TensorSpec((L, *shape), ("layers", *axes), init, geometry)

    first, first_two = quant.Geometry(1), quant.Geometry(2)  # contract D (F for w_down); wo contracts (N, H)
    return Params(
        embed=TensorSpec((V, D), ("vocab", "embed"), geometry=quant.Geometry(1, contract_first=False)),
        layers=Layer(
            attn_norm=stacked((D,), ("embed",), "ones"),
            wq=stacked((D, N, H), ("embed", "heads", "head_dim"), geometry=first),
            wk=stacked((D, K, H), ("embed", "kv_heads", "head_dim"), geometry=first),
            wv=stacked((D, K, H), ("embed", "kv_heads", "head_dim"), geometry=first),
            bq=stacked((N, H), ("heads", "head_dim")) if bias else None,
            bk=stacked((K, H), ("kv_heads", "head_dim")) if bias else None,
            bv=stacked((K, H), ("kv_heads", "head_dim")) if bias else None,
            wo=stacked((N, H, D), ("heads", "head_dim", "embed"), geometry=first_two),
            mlp_norm=stacked((D,), ("embed",), "ones"),
            w_gate=stacked((D, F), ("embed", "ffn"), geometry=first),
            w_up=stacked((D, F), ("embed", "ffn"), geometry=first),
            w_down=stacked((F, D), ("ffn", "embed"), geometry=first),
        ),
        final_norm=TensorSpec((D,), ("embed",), "ones"),
        lm_head=None if cfg.tie_embeddings else TensorSpec((D, V), ("embed", "vocab"), geometry=first),
    )


def _is_spec(x) -> bool:
    return isinstance(x, TensorSpec)


def abstract_params(cfg: ModelConfig, quantize: str = "none") -> Params:
    """ShapeDtypeStructs for every weight: eval_shape and loaders check against these. quantize: a mode of
    jaxinfer.quant holds every projection in its layout (a QuantArray of ShapeDtypeStructs)."""

    def leaf(spec: TensorSpec):
        layout = _mode_layout(spec, quantize)
        if layout is None:
            return jax.ShapeDtypeStruct(spec.shape, cfg.jnp_dtype)
        return quant.abstract(layout, spec.shape, spec.geometry, cfg.dtype, lead_ndim=len(spec.shape) - _own_ndim(spec))

    return jax.tree.map(leaf, param_specs(cfg), is_leaf=_is_spec)


def _mode_layout(spec: TensorSpec, quantize: str) -> str | None:
    """The layout a quantize mode holds this weight in; None: float ("none", "auto", or not a projection)."""
    quant.check_quantize(quantize)
    return quant.MODES.get(quantize) if spec.geometry is not None else None


def _own_ndim(spec: TensorSpec) -> int:
    return len(spec.shape) - (1 if spec.axes[0] == "layers" else 0)


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02, quantize: str = "none") -> Params:
    """Random weights (for tests and benchmarks: decode speed does not depend on their values).

    quantize: a mode of jaxinfer.quant draws each projection's codes and scales directly in its layout (a 7B
    preset never passes through float32); "none" and "auto": float weights."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    abstract = treedef.flatten_up_to(abstract_params(cfg, quantize))

    def init(spec: TensorSpec, k: jax.Array, shape) -> jax.Array:
        if quant.is_quant(shape):
            return quant.random(shape, k, scale)
        if spec.init == "ones":
            return jnp.ones(spec.shape, cfg.jnp_dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, cfg.jnp_dtype)
        return _normal(k, spec.shape, cfg.jnp_dtype, scale)

    return jax.tree.unflatten(treedef, [init(s, k, a) for s, k, a in zip(leaves, keys, abstract)])


def _normal(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_normal = jax.jit(_normal, static_argnums=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D]; normalized in float32, cast back, then scaled (HF's order of operations)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[H // 2] float32 inverse frequencies, scaled as cfg.rope_scaling says; host-side constants."""
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, heads, H], positions [B, T]: rotate the two halves of each head (HF's rotate_half layout)."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, heads, H/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def mlp(layer: Layer, x: jax.Array, matmul: str | None = None) -> jax.Array:
    """SwiGLU: x [B, T, D] -> [B, T, D]. matmul: Runtime.quantized_matmul."""
    gate, up = quant.einsums(["BTD,DF->BTF", "BTD,DF->BTF"], x, [layer.w_gate, layer.w_up], matmul=matmul)
    return quant.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, layer.w_down, matmul=matmul)


def embed_lookup(embed: jax.Array, tokens: jax.Array, tp_axis: str | None = None) -> jax.Array:
    """tokens [B, T] -> [B, T, D]. Under tensor parallelism embed is this device's rows of the vocabulary
    [V / tp, D]: tokens it does not hold contribute zeros and one psum assembles the rows (vocab-parallel)."""
    if tp_axis is None:
        return quant.take(embed, tokens)
    rows = embed.shape[0]
    local = tokens - jax.lax.axis_index(tp_axis) * rows  # [B, T]
    held = (local >= 0) & (local < rows)
    gathered = quant.take(embed, jnp.clip(local, 0, rows - 1))  # [B, T, D]
    x = jnp.where(held[..., None], gathered, jnp.zeros((), gathered.dtype))
    return jax.lax.psum(x, tp_axis)


def all_reduce(x: jax.Array, tp_axis: str | None) -> jax.Array:
    """Sum a row-parallel matmul's partial results over the tensor-parallel devices; unsharded: x itself."""
    return x if tp_axis is None else jax.lax.psum(x, tp_axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """One group of a forward's rows: B rows of T tokens, row b one cache sequence. A forward takes one group or
    several of different shapes (a step's decode rows [B, 1] beside a prompt's chunk [1, T]): the matmuls run
    over all their tokens at once (one read of the weights), attention and the cache write group by group."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32 absolute positions; -1 marks padding (not written, not attended)
    seq_ids: jax.Array  # [B] int32: row b reads and writes cache sequence seq_ids[b]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _GroupKeys:
    """What attention needs of one group of rows: positions [B, T], its rows of the page table [B, pages_per_seq]
    and kv_lengths [B] (keys written once this chunk is)."""

    positions: jax.Array
    page_table: jax.Array
    kv_lengths: jax.Array


def _split_tokens(x: jax.Array, groups) -> list[jax.Array]:
    """x [1, N, ...] over all groups' tokens -> [B, T, ...] per group (N = sum of B * T; static slices)."""
    parts, start = [], 0
    for g in groups:
        B, T = g.positions.shape
        parts.append(x[0, start : start + B * T].reshape(B, T, *x.shape[2:]))
        start += B * T
    return parts


def _join_tokens(parts: list[jax.Array]) -> jax.Array:
    """[B, T, ...] per group -> [1, N, ...]."""
    flat = [p.reshape(1, -1, *p.shape[2:]) for p in parts]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)


def attention_block(layer, cfg, x, inv_freq, pool, groups, write_to, index, backend, matmul=None):
    """x [1, N, D] (every group's tokens) -> ([1, N, D], pool): project, rotate, write layer `index` of the stacked
    cache pool (kv_cache.Pool: pages [L, K, P, page_size, H], and scales when quantized) at write_to (page, slot)
    [1, N], attend group by group, project out."""
    q, k, v = quant.einsums(["BTD,DNH->BTNH", "BTD,DKH->BTKH", "BTD,DKH->BTKH"], x, [layer.wq, layer.wk, layer.wv],
                            matmul=matmul)  # one kernel call on the CPU: x quantized once
    if cfg.qkv_bias:
        q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
    positions = _join_tokens([g.positions for g in groups])  # [1, N]
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    # Every group's K/V in one scatter, before any group attends: a write between two groups' reads of the pool
    # made XLA copy the whole pool (every layer's pages) in each layer rather than update it in place.
    pool = kv_cache.write_at(pool, k, v, *write_to, index)
    outs = [
        attn.attention(
            qg, pool.k_pages, pool.v_pages, g.page_table, g.positions, g.kv_lengths, sliding_window=cfg.sliding_window,
            backend=backend, layer=index, k_scales=pool.k_scales, v_scales=pool.v_scales,
        )  # [B, T, N, H]
        for g, qg in zip(groups, _split_tokens(q, groups))
    ]
    o = _join_tokens(outs)  # [1, N, heads, H]
    return quant.einsum("BTNH,NHD->BTD", o, layer.wo, matmul=matmul), pool  # one [1, T, N*H] x [N*H, D] dot


def decoder_layer(layer, cfg, x, pool, index, *, groups, write_to, inv_freq, backend, tp_axis, matmul=None):
    """One layer: x [1, N, D] -> x [1, N, D], with this chunk's K/V written into layer `index` of the cache;
    groups: a _GroupKeys per group of rows, in the order of their tokens in x; write_to: where each token's K/V
    goes, kv_cache.page_addresses' (page, slot) [1, N]."""
    layer = quant.after(layer, x, matmul)  # a quantized layer's weights are dequantized as it runs, not at the start
    with jax.named_scope("attention"):
        h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
        h, pool = attention_block(layer, cfg, h, inv_freq, pool, groups, write_to, index, backend, matmul)
        x = x + all_reduce(h, tp_axis)
    with jax.named_scope("mlp"):
        x = x + all_reduce(mlp(layer, rms_norm(x, layer.mlp_norm, cfg.norm_eps), matmul), tp_axis)
    return x, pool


# The unrolled layout calls its layers through one jit: every layer has the same shapes, so the layer is traced
# and lowered once (a call XLA inlines), not 30 times. Measured on the default model's engine step: trace 4.1 ->
# 0.5 s, lowering 1.7 -> 0.7 s per start, the decode step no slower (56.8 vs 64.3 ms median, interleaved).
_decoder_layer_call = jax.jit(decoder_layer, static_argnames=("cfg", "backend", "tp_axis", "matmul"))


# ---------------------------------------------------------------------------------------------
# The forward pass


def forward_hidden(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32 absolute positions; -1 marks padding (not written, not attended)
    cache: kv_cache.KVCache,
    seq_ids: jax.Array,  # [B] int32: row b reads and writes cache sequence seq_ids[b]
    *,
    runtime: Runtime = DEFAULT_RUNTIME,
    tp_axis: str | None = None,
) -> tuple[jax.Array, kv_cache.KVCache]:
    """-> (final-normed hidden states [B, T, D], cache with this chunk's K/V written): forward_rows of one group.

    params.layers: stacked, run as one scan body; a tuple of layers, unrolled (see the module docstring).
    runtime: the attention backend (runtime.mesh is jaxinfer.sharding's business: it calls this inside shard_map).
    tp_axis: inside shard_map, the mesh axis the heads, F and V are split over; params and cache are then this
    device's shards, and each layer ends its attention and its MLP with one psum.
    """
    (hidden,), cache = forward_rows(
        params, cfg, (Rows(tokens, positions, seq_ids),), cache, runtime=runtime, tp_axis=tp_axis
    )
    return hidden, cache


def forward_rows(
    params: Params, cfg: ModelConfig, rows: tuple[Rows, ...], cache: kv_cache.KVCache, *,
    runtime: Runtime = DEFAULT_RUNTIME, tp_axis: str | None = None,
) -> tuple[tuple[jax.Array, ...], kv_cache.KVCache]:
    """One forward over several groups of rows (Rows: one group's [B, T] tokens) -> (final-normed hidden states
    [B, T, D] per group, cache with every group's K/V written). No two rows may write the same sequence.
    See forward_hidden for runtime and tp_axis."""
    groups = []
    for r in rows:
        page_table = cache.page_table[r.seq_ids]  # [B, pages_per_seq]
        kv_lengths = jnp.maximum(cache.lengths[r.seq_ids], jnp.max(r.positions, axis=1) + 1)  # [B]
        groups.append(_GroupKeys(r.positions, page_table, kv_lengths))
    groups = tuple(groups)
    _, _, num_pages, page_size, _ = cache.k_pages.shape
    addresses = [kv_cache.page_addresses(g.page_table, g.positions, num_pages, page_size) for g in groups]
    write_to = tuple(_join_tokens([a[i] for a in addresses]) for i in (0, 1))  # (page, slot) [1, N] each
    layer_args = dict(groups=groups, write_to=write_to, inv_freq=rope_inv_freq(cfg), backend=runtime.attention_backend,
                      tp_axis=tp_axis, matmul=runtime.quantized_matmul)
    with jax.named_scope("embed"):
        x = embed_lookup(params.embed, _join_tokens([r.tokens for r in rows]), tp_axis)  # [1, N, D]
    pool = cache.pool  # pages [L, K, P, page_size, H] (and a quantized cache's scales)
    if isinstance(params.layers, tuple):
        for i, layer in enumerate(params.layers):
            with jax.named_scope(f"layer_{i}"):
                x, pool = _decoder_layer_call(layer, cfg, x, pool, jnp.int32(i), **layer_args)
    else:
        # The whole stacked cache is carried (the scatter of each layer's K/V into it is in place). Layer i's
        # weights: those a CPU kernel contracts stay whole, read where they lie (layer_at), the others are sliced.
        # In a trace, each iteration of the scan's while loop is a layer.
        tokens = x.shape[0] * x.shape[1]  # x [1, N, D]: every projection of a layer meets N rows

        def body(carry, i):
            x, pool = carry
            layer = layer_at(params.layers, i, runtime.quantized_matmul, tokens)
            with jax.named_scope("layer"):
                return decoder_layer(layer, cfg, x, pool, i, **layer_args), None

        (x, pool), _ = jax.lax.scan(body, (x, pool), jnp.arange(cfg.num_layers, dtype=jnp.int32))
    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    lengths = cache.lengths
    for r, g in zip(rows, groups):  # a row without tokens (padding) leaves its sequence's length alone
        written = jnp.where(jnp.max(r.positions, axis=1) >= 0, r.seq_ids, lengths.shape[0])  # [B]
        lengths = lengths.at[written].set(g.kv_lengths, mode="drop")
    cache = cache.with_pool(pool, lengths)
    return tuple(_split_tokens(x, groups)), cache


def logits(params: Params, cfg: ModelConfig, hidden: jax.Array, matmul: str | None = None) -> jax.Array:
    """hidden [..., D] -> logits [..., V] float32 (tied head reuses the embedding). matmul: Runtime.quantized_matmul."""
    head, spec = (params.embed, "...D,VD->...V") if params.lm_head is None else (params.lm_head, "...D,DV->...V")
    with jax.named_scope("logits"):
        return quant.einsum_by_rows(spec, hidden, head, matmul=matmul, preferred_element_type=jnp.float32)


def forward(params, cfg, tokens, positions, cache, seq_ids, *, runtime: Runtime = DEFAULT_RUNTIME):
    """tokens [B, T] -> (logits [B, T, V] float32, cache). See forward_hidden for the arguments."""
    hidden, cache = forward_hidden(params, cfg, tokens, positions, cache, seq_ids, runtime=runtime)
    return logits(params, cfg, hidden, runtime.quantized_matmul), cache
