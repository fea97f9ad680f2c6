"""Quantized matmul on the CPU through jax.ffi: y[..., N] = x[..., K] @ dequantize(W).T, W stored [N, K] in blocks.

Kernel (qmatmul.cc, built by build.py), wrapper (`qmatmul`), reference (`qmatmul_reference`, plain jnp) in one file.
The weight arrives as plain arrays, a layout name and its parts, as jaxinfer.quant's QuantArray holds them
(storage order: the output rows first, blocks of 32 along the contraction K last):

    q8_0          values int8 [N, K],            scales float16 [N, K/32]                   w = d * q
    q4_0          values uint8 [N, K/2] nibbles, scales float16 [N, K/32]                   w = d * (q - 8)
    int4_g32_min  values uint8 [N, K/2] nibbles, scales, mins float16 [N, K/32] (GGUF Q4_1) w = d * q + m

Nibbles in ggml's order: in each block's 16 bytes, byte j holds code j (low nibble) and code j + 16 (high nibble).
By default x is quantized per block of 32 to int8 with a float32 scale (llama.cpp's Q8_0 / Q8_1) and the blocks are
integer dots; activations="int16" rounds x to a 256 times finer grid (max|x| / 32767 per block), integer dots too
(madd: about int8's speed at M = 1, streamed; tiles of 4 rows of x beyond); activations="float32" keeps x in float
(a panel of W dequantized in cache, then float dots): exact, and as fast as int8 from ~32-64 rows of x on ("auto"
picks int8 or float32 by rows). Stacked layers: pass the whole [L, N, n] stack and
`layer=i` (a sliced operand of a custom call is copied under lax.scan).

    JAXINFER_CPU_KERNELS_ISA=scalar|avx2|avx512   the highest instruction set the kernel may use (default: the best
                                                  the CPU has): tests cover every path on one machine
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu_kernels import build

BLOCK = 32
# layout -> its parts: (name, dtype, elements of K per stored element), in the kernel's argument order.
LAYOUTS: dict[str, tuple[tuple[str, np.dtype, int], ...]] = {
    "q8_0": (("values", np.dtype(np.int8), 1), ("scales", np.dtype(np.float16), BLOCK)),
    "q4_0": (("values", np.dtype(np.uint8), 2), ("scales", np.dtype(np.float16), BLOCK)),
    "int4_g32_min": (("values", np.dtype(np.uint8), 2), ("scales", np.dtype(np.float16), BLOCK),
                     ("mins", np.dtype(np.float16), BLOCK)),
}
ISAS = ("scalar", "avx2", "avx512")  # qmatmul.cc's Isa values 1, 2, 3
ISA_ENV = build.ISA_ENV
ACTIVATIONS = ("int8", "int16", "float32", "auto")
ACTIVATION_BITS = {"int8": 8, "int16": 16, "float32": 32}  # the kernel's activation_bits attribute
# activations="auto": from this many rows of x on, float activations (a dequantized panel of W through an sgemm tile)
# run as fast as int8 block dots on AVX2 (measured in thread CPU time, weights in cache, 2026-12-03), and are exact.
# q8_0's dot costs more per block (abs and sign, no two blocks per load as the nibbles have).
FLOAT_ACTIVATIONS_FROM_M = {"q8_0": 32, "q4_0": 64, "int4_g32_min": 64}


def supported_isas() -> tuple[str, ...]:
    """The instruction sets the kernel may use on this CPU, lowest first (builds the kernels if need be; see
    build.UNVERIFIED_ISAS)."""
    return build.usable_isas(ISAS, build.library().best_isa)


def _isa_code(isa: str | None) -> int:
    """isa (None: $JAXINFER_CPU_KERNELS_ISA, else the best) -> the kernel's `isa` attribute (0: the best)."""
    isa = isa or os.environ.get(ISA_ENV) or None
    if isa is None:
        return len(supported_isas())  # the best usable
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r} must be one of {ISAS} (or set {ISA_ENV})")
    if isa not in supported_isas():
        raise ValueError(f"isa={isa!r} is not available on this CPU, which runs {supported_isas()}")
    return ISAS.index(isa) + 1


def check_parts(layout: str, parts: dict, k: int, stacked: bool = False) -> tuple[int, ...]:
    """The parts' leading shape, (N,) or stacked (L, N), for contraction size k; ValueError naming what does not fit."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} has no CPU kernel; one of {tuple(LAYOUTS)}")
    spec = LAYOUTS[layout]
    names = tuple(name for name, _, _ in spec)
    if set(parts) != set(names):
        raise ValueError(f"{layout} takes parts {names}, got {tuple(parts)}")
    if k % BLOCK:
        raise ValueError(f"K={k} (x's last dim) must be a multiple of {BLOCK} for {layout}")
    lead_ndim = 2 if stacked else 1
    lead = tuple(parts["values"].shape[:-1])
    for name, dtype, per in spec:
        part = parts[name]
        if part.dtype != dtype:
            raise ValueError(f"{layout} part {name!r} must be {dtype}, got {part.dtype}")
        if part.ndim != lead_ndim + 1 or part.shape != (*lead, k // per):
            what = "[L, N, n] (layer= given)" if stacked else "[N, n]"
            raise ValueError(f"{layout} part {name!r} has shape {part.shape}; expected {what} with n = {k // per} "
                             f"for K={k}, the lead dims of 'values' {lead}")
    return lead


def _check_call(x: jax.Array, activations: str, threads: int | None) -> None:
    """ValueError naming a bad activations, threads or x dtype."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} must be one of {ACTIVATIONS}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")


def qmatmul(x: jax.Array, layout: str, parts: dict[str, jax.Array], *, layer: jax.Array | int | None = None,
            activations: str = "int8", threads: int | None = None, isa: str | None = None) -> jax.Array:
    """x [..., K] (float32 or bfloat16) @ dequantize(W).T -> float32 [..., N], W [N, K] stored as `layout`'s parts.

    layer: None, each part [N, n]; or an int32 scalar (traced or not) picking W from parts stacked [L, N, n]. Under
    lax.scan pass the whole stack and the layer index rather than the scanned slice: a slice passed to a custom call
    is copied first (measured: 3x the time of a 49152 x 576 q4_0 matvec).
    activations: "int8" (x quantized per block of 32, integer block dots), "int16" (x rounded to 16 bits per block of
    32: KLD ~1e-7 against float), "float32" (float dots), or "auto" (int8 below FLOAT_ACTIVATIONS_FROM_M[layout] rows
    of x, float32 from there).
    threads: at most this many threads (None: one per core; parallel_for.h says whose). isa: the highest
    instruction set to use (None: $JAXINFER_CPU_KERNELS_ISA, else the CPU's best). Works under jit, lax.scan, vmap
    (vmap_method="expand_dims": batched weights loop in the kernel) and shard_map (local shards)."""
    _check_call(x, activations, threads)
    k = x.shape[-1]
    lead = check_parts(layout, parts, k, stacked=layer is not None)
    n = lead[-1]
    if layer is None:
        parts, layer = {name: p[None] for name, p in parts.items()}, 0  # [1, N, n]: a stack of one
    layer = check_layer(layer)
    batch = x.shape[:-1]
    x2 = x.astype(jnp.float32).reshape(-1, k)  # [M, K]: the leading dims fold into M
    if x2.shape[0] == 0:
        return jnp.zeros((*batch, n), jnp.float32)
    if activations == "auto":
        activations = "float32" if x2.shape[0] >= FLOAT_ACTIVATIONS_FROM_M[layout] else "int8"
    call = jax.ffi.ffi_call(f"jaxinfer_qmatmul_{layout}", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                            vmap_method="expand_dims")
    build.library()  # built and registered before the call is lowered
    y = call(x2, layer, *(parts[name] for name, _, _ in LAYOUTS[layout]),
             threads=np.int64(threads or 0), isa=np.int64(_isa_code(isa)),
             activation_bits=np.int64(ACTIVATION_BITS[activations]))
    return y.reshape(*batch, n)  # [M, N] -> [..., N]


def qmatmul_many(x: jax.Array, layout: str, weights: list[dict[str, jax.Array]], *,
                 layer: jax.Array | int | None = None, activations: str = "int8", threads: int | None = None,
                 isa: str | None = None) -> list[jax.Array]:
    """[qmatmul(x, layout, w, layer=layer) for w in weights] in one call (a layer's q, k and v; its gate and up): x
    quantized once, every weight's rows shared among the threads together, one hand-off to them. Each w [N_j, K], or
    with layer= every w stacked [L, N_j, K] (qmatmul says why), all of one layout; results float32 [..., N_j]. Works
    under jit and lax.scan (vmap: one call per batch element)."""
    if not weights:
        raise ValueError("qmatmul_many takes at least one weight")
    _check_call(x, activations, threads)
    k = x.shape[-1]
    leads = [check_parts(layout, w, k, stacked=layer is not None) for w in weights]
    if layer is None:
        weights, layer = [{name: p[None] for name, p in w.items()} for w in weights], 0  # stacks of one
    elif len({lead[0] for lead in leads}) != 1:
        raise ValueError(f"the stacked weights hold different numbers of layers: {[lead[0] for lead in leads]}")
    layer = check_layer(layer)
    ns = [lead[-1] for lead in leads]
    batch = x.shape[:-1]
    x2 = x.astype(jnp.float32).reshape(-1, k)  # [M, K]
    if x2.shape[0] == 0:
        return [jnp.zeros((*batch, n), jnp.float32) for n in ns]
    if activations == "auto":
        activations = "float32" if x2.shape[0] >= FLOAT_ACTIVATIONS_FROM_M[layout] else "int8"
    call = jax.ffi.ffi_call(f"jaxinfer_qmatmul_many_{layout}",
                            [jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32) for n in ns],
                            vmap_method="sequential")
    build.library()  # built and registered before the call is lowered
    names = [name for name, _, _ in LAYOUTS[layout]]
    ys = call(x2, layer, *(w[name] for w in weights for name in names), threads=np.int64(threads or 0),
              isa=np.int64(_isa_code(isa)), activation_bits=np.int64(ACTIVATION_BITS[activations]))
    return [y.reshape(*batch, n) for y, n in zip(ys, ns)]


def check_layer(layer) -> jax.Array:
    """layer (int or traced) -> an int32 scalar, or a ValueError naming what it is."""
    layer = jnp.asarray(layer)
    if layer.shape != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got {layer.dtype}{list(layer.shape)}")
    return layer.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Reference, plain jnp, float32


def _nibbles(packed: jax.Array) -> jax.Array:
    """[N, K/2] uint8 -> [N, K] int32 codes 0..15: in each block's 16 bytes, byte j holds code j low, j + 16 high."""
    runs = packed.astype(jnp.int32).reshape(*packed.shape[:-1], -1, BLOCK // 2)  # [N, K/32, 16]
    return jnp.stack([runs & 15, runs >> 4], axis=-2).reshape(*packed.shape[:-1], -1)  # [N, K/32, 2, 16] -> [N, K]


def dequantize_reference(layout: str, parts: dict[str, jax.Array]) -> jax.Array:
    """A layout's parts -> float32 W [N, K]."""
    codes = parts["values"].astype(jnp.int32) if layout == "q8_0" else _nibbles(parts["values"])  # [N, K]
    blocks = codes.reshape(*codes.shape[:-1], -1, BLOCK).astype(jnp.float32)  # [N, K/32, 32]
    d = parts["scales"].astype(jnp.float32)[..., None]  # [N, K/32, 1]
    if layout == "q8_0":
        w = d * blocks
    elif layout == "q4_0":
        w = d * (blocks - 8)
    elif layout == "int4_g32_min":
        w = d * blocks + parts["mins"].astype(jnp.float32)[..., None]
    else:
        raise ValueError(f"layout={layout!r} has no CPU kernel; one of {tuple(LAYOUTS)}")
    return w.reshape(codes.shape)


def quantize_activations_reference(x: jax.Array, bits: int = 8) -> jax.Array:
    """x [..., K] -> float32 [..., K] as the kernel sees it: per block of 32, d = max|x| / Q, q = round(x * (1 / d))
    (ties to even), x ~ d * q, Q = 127 (bits 8) or 32767 (bits 16)."""
    top = {8: 127.0, 16: 32767.0}[bits]
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, BLOCK)  # [..., K/32, 32]
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / top
    inverse = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    q = jnp.clip(jnp.round(blocks * inverse), -top, top)
    return (d * q).reshape(x.shape)


def qmatmul_reference(x: jax.Array, layout: str, parts: dict[str, jax.Array], *,
                      activations: str = "float32") -> jax.Array:
    """x [..., K] @ dequantize(W).T in float32 -> [..., N]. activations="int8" / "int16": x first rounded as the
    kernel rounds it (the kernel's own arithmetic up to the order of float sums); "float32": the exact product."""
    if activations not in ACTIVATION_BITS:
        raise ValueError(f"activations={activations!r} must be one of {tuple(ACTIVATION_BITS)}")
    x = x.astype(jnp.float32)
    if activations != "float32":
        x = quantize_activations_reference(x, ACTIVATION_BITS[activations])
    w = dequantize_reference(layout, parts)  # [N, K]
    return jnp.einsum("...k,nk->...n", x, w, precision=jax.lax.Precision.HIGHEST)
