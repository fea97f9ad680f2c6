"""Float32 matmul on the CPU through jax.ffi, for weights held in float32: y[..., N] = x[..., K] W.

Kernel (fmatmul.cc, built by build.py), wrapper (`fmatmul`), reference (`fmatmul_reference`, plain jnp) in one file.
W in either orientation the model holds: contract_first W [K, N] (the projections), or W [N, K] (the tied head, the
embedding [V, D]). Stacked layers: pass the whole [L, ...] stack and `layer=i` (under lax.scan XLA copies a sliced
operand of a custom call, and its own dots copy a sliced weight too). Decode reads W once, in storage order, at
memory speed; from a few rows of x on XLA's sgemm is the faster (jaxinfer.quant routes by rows).

    JAXINFER_CPU_KERNELS_ISA=scalar|avx2   the highest instruction set the kernel may use (default: the CPU's best)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels.qmatmul import check_layer

ISAS = ("scalar", "avx2")  # fmatmul.cc's Isa values 1, 2


def supported_isas() -> tuple[str, ...]:
    """The instruction sets the kernel may use on this CPU, lowest first (builds the kernels if need be)."""
    best = int(build.library().handle.jaxinfer_fmatmul_best_isa())
    return ISAS[:best]


def _isa_code(isa: str | None) -> int:
    """isa (None: $JAXINFER_CPU_KERNELS_ISA where it names one of ISAS, else the best) -> the `isa` attribute."""
    if isa is None:
        isa = os.environ.get(build.ISA_ENV)
        if isa not in ISAS:
            return 0  # the best (an ISA this kernel lacks, avx512, means its best too)
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r} must be one of {ISAS} (or set {build.ISA_ENV})")
    if isa not in supported_isas():
        raise ValueError(f"isa={isa!r} is not available on this CPU, which runs {supported_isas()}")
    return ISAS.index(isa) + 1


def fmatmul(x: jax.Array, w: jax.Array, *, contract_first: bool, layer: jax.Array | int | None = None,
            threads: int | None = None, isa: str | None = None) -> jax.Array:
    """x [..., K] (float32) times W -> float32 [..., N]: W [K, N] (contract_first) or [N, K], float32; with layer=
    (an int32 scalar, traced or not) w is a stack [L, K, N] / [L, N, K] and W its layer `layer`.
    threads: at most this many (None: one per core). Works under jit, lax.scan, vmap (one call per batch element)
    and shard_map (local shards)."""
    k, n = _check(x, w, contract_first, layer, threads)
    if layer is None:
        w, layer = w[None], 0  # a stack of one
    layer = check_layer(layer)
    batch = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] == 0:
        return jnp.zeros((*batch, n), jnp.float32)
    call = jax.ffi.ffi_call("jaxinfer_fmatmul", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    build.library()  # built and registered before the call is lowered
    y = call(x2, layer, w, contract_first=np.int64(contract_first), threads=np.int64(threads or 0),
             isa=np.int64(_isa_code(isa)))
    return y.reshape(*batch, n)


def _check(x: jax.Array, w: jax.Array, contract_first: bool, layer, threads: int | None) -> tuple[int, int]:
    """(K, N) of x times W, or a ValueError naming what does not fit."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"fmatmul takes float32 x and w, got {x.dtype} and {w.dtype}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    stacked = layer is not None
    if w.ndim != 2 + stacked:
        what = "[L, K, N] / [L, N, K] (layer= given)" if stacked else "[K, N] / [N, K]"
        raise ValueError(f"w has shape {w.shape}; expected {what}")
    k = x.shape[-1]
    w_k, n = (w.shape[-2], w.shape[-1]) if contract_first else (w.shape[-1], w.shape[-2])
    if w_k != k:
        raise ValueError(f"x's last dim {k} does not match w {w.shape}'s contracted dim "
                         f"({'first' if contract_first else 'last'} of its own)")
    return k, n


def fmatmul_many(x: jax.Array, ws: list[jax.Array], *, layer: jax.Array | int | None = None,
                 threads: int | None = None, isa: str | None = None) -> list[jax.Array]:
    """[fmatmul(x, w, contract_first=True, layer=layer) for w in ws] in one call (a layer's q, k and v; its gate and
    up): every product's chunks shared among the threads together, one hand-off to them. Each w [K, N_j], or with
    layer= stacked [L, K, N_j]. Works under jit and lax.scan (vmap: one call per batch element)."""
    if not ws:
        raise ValueError("fmatmul_many takes at least one weight")
    k = x.shape[-1]
    for w in ws:
        _check(x, w, True, layer, threads)
    if layer is None:
        ws, layer = [w[None] for w in ws], 0  # stacks of one
    layer = check_layer(layer)
    ns = [w.shape[-1] for w in ws]
    batch = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.shape[0] == 0:
        return [jnp.zeros((*batch, n), jnp.float32) for n in ns]
    call = jax.ffi.ffi_call("jaxinfer_fmatmul_many", [jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32) for n in ns],
                            vmap_method="sequential")
    build.library()  # built and registered before the call is lowered
    ys = call(x2, layer, *ws, threads=np.int64(threads or 0), isa=np.int64(_isa_code(isa)))
    return [y.reshape(*batch, n) for y, n in zip(ys, ns)]


def fmatmul_reference(x: jax.Array, w: jax.Array, *, contract_first: bool) -> jax.Array:
    """x [..., K] times W [K, N] (contract_first) or [N, K], in float32 at HIGHEST precision -> [..., N]."""
    spec = "...k,kn->...n" if contract_first else "...k,nk->...n"
    return jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
