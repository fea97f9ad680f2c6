"""Quantized weights: held at their stored precision from the file to the matmul.

A QuantArray is a pytree leaf of Params like a float weight: its packed codes, scales and (where the layout has
them) mins are its children, the layout and the contraction's geometry its static fields. Every projection of
model.py calls `einsum`, which takes a float array or a QuantArray alike; the model never asks which it holds.

Storage: a weight's logical shape is ours, einsum-ready ([D, N, H] for wq, [N, H, D] for wo, [V, D] for embed);
it is stored as the checkpoints store it, the output dims first and the contraction flattened last ([N, H, D] for
wq, [D, N*H] for wo), so blocks run along the contraction axis and each part of a QuantArray is
`[*lead, *out, n]` with n counted along that axis (codes, blocks' scales): a leading layer axis slices off every
part alike under `lax.scan`, and a sharded axis splits every part alike under `shard_map`.

Layouts (LAYOUTS), named after what they hold. Two 4-bit codes share a byte in ggml's order: in each run of 32
codes, byte i holds code i in its low nibble and code i + 16 in its high one.
- int8_channel: int8 codes, one float32 scale per output channel.        x = s * q
- fp8_channel:  float8_e4m3fn codes, one float32 scale per output channel. x = s * q
- q8_0:         int8 codes, a float16 scale per 32 (GGUF Q8_0).          x = d * q
- q4_0:         4-bit codes, a float16 scale per 32 (GGUF Q4_0).         x = d * (q - 8)
- int4_g{32,64,128}_min: 4-bit codes, float16 scale and min per group (int4_g32_min is GGUF Q4_1). x = d * q + m
- q5_0, q5_1:   4-bit codes and a bit plane of fifth bits, a float16 scale (q5_1: and min) per 32 (GGUF Q5_0,
                Q5_1).                                                    x = d * (q - 16), x = d * q + m
- q4_k, q5_k:   4-bit codes (q5_k: a fifth bit in a bit plane), 6-bit scale and min per 32 under a float16 scale
                and min per 256 (GGUF Q4_K / Q5_K).                       x = (d * sc) * q - (dmin * m)
- q6_k:         4 low bits and a 2-bit plane, an int8 scale per 16 under a float16 scale per 256 (GGUF Q6_K).
                                                                          x = (d * sc) * (q - 32)
Every product above is exact in float32 (an 11-bit float16 significand times codes and sub-scales of at most 13
bits), so dequantization equals gguf.quants' bit for bit whether or not XLA fuses a multiply-add.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxinfer import cpu_kernels
from jaxinfer.cpu_kernels import fmatmul as cpu_fmatmul
from jaxinfer.cpu_kernels import qmatmul as cpu_qmatmul
from jaxinfer.quant_modes import KERNEL_ACTIVATIONS, MODES, QUANTIZE_CHOICES, QUANTIZED_MATMULS

# --------------------------------------------------------------------------------------------
# Layouts


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    dtype: str
    per: int | None  # elements of the contraction axis per stored element; None: one per output channel


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    block: int | None  # elements per smallest scale block along the contraction axis; None: the whole axis
    parts: tuple[Part, ...]
    decode: Callable[..., jax.Array]  # (parts dict, each [..., n]) -> float32 [..., C]
    # (parts) -> float32 (low, high) [..., C / 2]: the codes of each run of 32's low and high nibbles, for the
    # layouts whose codes are nibbles alone. einsum contracts each half against its half of x: no interleaving.
    decode_halves: Callable[..., tuple[jax.Array, jax.Array]] | None = None

    @property
    def multiple(self) -> int:
        """The contraction axis (and each shard of it) must be a multiple of this."""
        return max([p.per for p in self.parts if p.per is not None] + [self.block or 1])

    def bits_per_weight(self, contraction: int) -> float:
        return sum(np.dtype(_DTYPES[p.dtype]).itemsize * 8 / (p.per or contraction) for p in self.parts)


_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float16": np.float16, "float32": np.float32,
           "float8_e4m3fn": ml_dtypes.float8_e4m3fn}


def numpy_dtype(name: str):
    """A part's dtype name (Part.dtype) -> its numpy dtype (float8_e4m3fn from ml_dtypes)."""
    return _DTYPES[name]


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[..., C] -> [..., C / size, size]."""
    return x.reshape(*x.shape[:-1], -1, size)


def nibbles(packed: jax.Array) -> jax.Array:
    """[..., C / 2] uint8 -> [..., C] int32 codes 0..15, in runs of 32 (byte i: code i low, code i + 16 high)."""
    runs = _blocks(packed, 16).astype(jnp.int32)  # [..., C / 32, 16]
    return jnp.stack([runs & 15, runs >> 4], axis=-2).reshape(*packed.shape[:-1], -1)  # [..., C / 32, 2, 16]


def bit_planes(packed: jax.Array, width: int) -> jax.Array:
    """[..., C * width / 8] uint8 -> [..., C] int32: byte i holds codes i * 8 / width + j at bits width * j."""
    shifts = jnp.arange(0, 8, width, dtype=jnp.int32)
    return ((packed.astype(jnp.int32)[..., None] >> shifts) & (2**width - 1)).reshape(*packed.shape[:-1], -1)


def _scaled(codes: jax.Array, scale: jax.Array, block: int, offset: jax.Array | None = None) -> jax.Array:
    """codes [..., C] float32 times a scale per block [..., C / block] (+ an offset per block) -> [..., C]."""
    x = _blocks(codes.astype(jnp.float32), block) * scale.astype(jnp.float32)[..., None]
    if offset is not None:
        x = x + offset.astype(jnp.float32)[..., None]
    return x.reshape(codes.shape)


def _per_sub_block(super_value: jax.Array, sub: jax.Array) -> jax.Array:
    """A float16 value per 256 [..., C / 256] times an integer per sub-block [..., C / sub] -> float32 [..., C / sub]."""
    per_super = sub.shape[-1] // super_value.shape[-1]
    return (super_value.astype(jnp.float32)[..., None] * _blocks(sub.astype(jnp.float32), per_super)).reshape(sub.shape)


def _halves_scaled(packed: jax.Array, scale: jax.Array, block: int, offset=None, zero_point: int = 0):
    """Nibbles [..., C / 2] -> float32 (low, high) [..., C / 2], each times a scale per block (+ an offset)."""
    b = packed.astype(jnp.int32)
    return tuple(_scaled(q - zero_point, scale, block // 2, offset) for q in (b & 15, b >> 4))


def _decode_channel(p):
    return p["values"].astype(jnp.float32) * p["scales"]


def _decode_q8_0(p):
    return _scaled(p["values"], p["scales"], 32)


def _decode_q4_0(p):
    return _scaled(nibbles(p["values"]) - 8, p["scales"], 32)


def _decode_int4_min(group):
    return lambda p: _scaled(nibbles(p["values"]), p["scales"], group, p["mins"])


def _halves_int4_min(group):
    return lambda p: _halves_scaled(p["values"], p["scales"], group, p["mins"])


def _halves_q4_0(p):
    return _halves_scaled(p["values"], p["scales"], 32, zero_point=8)


def _halves_q4_k(p):
    scale = _per_sub_block(p["super_scales"], p["scales"])
    return _halves_scaled(p["values"], scale, 32, -_per_sub_block(p["super_mins"], p["mins"]))


def _fifth_bit_codes(p) -> jax.Array:
    """q5_0 / q5_1 codes 0..31 [..., C]: nibbles and a bit plane of fifth bits."""
    return nibbles(p["values"]) | (bit_planes(p["high_bits"], 1) << 4)


def _decode_q5_0(p):
    return _scaled(_fifth_bit_codes(p) - 16, p["scales"], 32)


def _decode_q5_1(p):
    return _scaled(_fifth_bit_codes(p), p["scales"], 32, p["mins"])


def _decode_k_min(fifth_bit: bool):
    def decode(p):
        q = nibbles(p["values"])
        if fifth_bit:
            q = q | (bit_planes(p["high_bits"], 1) << 4)
        scale = _per_sub_block(p["super_scales"], p["scales"])  # [..., C / 32]
        low = _per_sub_block(p["super_mins"], p["mins"])
        return _scaled(q, scale, 32, -low)  # d * q + (-dm): the same rounding as gguf's d * q - dm

    return decode


def _decode_q6_k(p):
    q = (nibbles(p["values"]) | (bit_planes(p["high_bits"], 2) << 4)) - 32
    return _scaled(q, _per_sub_block(p["super_scales"], p["scales"]), 16)


_NIBBLES = Part("values", "uint8", 2)
_FIFTH_BITS = Part("high_bits", "uint8", 8)
_K_MIN = (Part("scales", "uint8", 32), Part("mins", "uint8", 32), Part("super_scales", "float16", 256),
          Part("super_mins", "float16", 256))


def _int4_min(group: int) -> Layout:
    return Layout(f"int4_g{group}_min", group,
                  (_NIBBLES, Part("scales", "float16", group), Part("mins", "float16", group)), _decode_int4_min(group),
                  _halves_int4_min(group))


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("int8_channel", None, (Part("values", "int8", 1), Part("scales", "float32", None)), _decode_channel),
        Layout("fp8_channel", None, (Part("values", "float8_e4m3fn", 1), Part("scales", "float32", None)),
               _decode_channel),
        Layout("q8_0", 32, (Part("values", "int8", 1), Part("scales", "float16", 32)), _decode_q8_0),
        Layout("q4_0", 32, (_NIBBLES, Part("scales", "float16", 32)), _decode_q4_0, _halves_q4_0),
        _int4_min(32),
        _int4_min(64),
        _int4_min(128),
        Layout("q5_0", 32, (_NIBBLES, _FIFTH_BITS, Part("scales", "float16", 32)), _decode_q5_0),
        Layout("q5_1", 32, (_NIBBLES, _FIFTH_BITS, Part("scales", "float16", 32), Part("mins", "float16", 32)),
               _decode_q5_1),
        Layout("q4_k", 32, (_NIBBLES, *_K_MIN), _decode_k_min(False), _halves_q4_k),
        Layout("q5_k", 32, (_NIBBLES, _FIFTH_BITS, *_K_MIN), _decode_k_min(True)),
        Layout("q6_k", 16, (_NIBBLES, Part("high_bits", "uint8", 4), Part("scales", "int8", 16),
                            Part("super_scales", "float16", 256)), _decode_q6_k),
    )
}



def check_quantize(quantize) -> str:
    """The `quantize=` value, or a ValueError naming it."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} must be one of {QUANTIZE_CHOICES}")
    return quantize


# --------------------------------------------------------------------------------------------
# The array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["parts"],
                   meta_fields=["layout", "out_ndim", "contract_first", "contract_inner", "dtype"])
@dataclasses.dataclass
class QuantArray:
    """A weight at its stored precision. parts: name -> [*lead, *out, n] (Layout.parts); lead: stacked layers.

    The logical shape is lead + contracted + out (contract_first: projections, [D, N, H]) or lead + out +
    contracted (the embedding [V, D]); the contracted dims are stored flattened as the last axis, whose first dim
    alone may be sharded: contract_inner holds the sizes of the others (wo's head_dim)."""

    parts: dict[str, jax.Array]
    layout: str
    out_ndim: int
    contract_first: bool
    contract_inner: tuple[int, ...]
    dtype: str  # what dequantize gives

    @property
    def spec(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def contraction(self) -> int:
        """C: the contracted dims' size, flattened."""
        first = self.spec.parts[0]
        return self.parts[first.name].shape[-1] * first.per

    @property
    def lead_ndim(self) -> int:
        return self.parts[self.spec.parts[0].name].ndim - 1 - self.out_ndim

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = self.parts[self.spec.parts[0].name].shape
        return tuple(shape[self.lead_ndim : -1])

    @property
    def contract_shape(self) -> tuple[int, ...]:
        return (self.contraction // math.prod(self.contract_inner), *self.contract_inner)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (einsum-layout) shape."""
        lead = self.parts[self.spec.parts[0].name].shape[: self.lead_ndim]
        own = (self.contract_shape + self.out_shape) if self.contract_first else (self.out_shape + self.contract_shape)
        return (*lead, *own)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.parts.values())

    def storage_axis(self, axis: int) -> int:
        """The parts' axis holding logical axis `axis` (an out axis or the first contracted one)."""
        lead = self.lead_ndim
        if axis < lead:
            return axis
        own = axis - lead
        contract_ndim = 1 + len(self.contract_inner)
        if self.contract_first:
            return lead + own - contract_ndim if own >= contract_ndim else (lead + self.out_ndim if own == 0 else -1)
        return lead + own if own < self.out_ndim else (lead + self.out_ndim if own == self.out_ndim else -1)

    def map_parts(self, f: Callable[[jax.Array], jax.Array]) -> QuantArray:
        return dataclasses.replace(self, parts={k: f(v) for k, v in self.parts.items()})


def is_quant(x) -> bool:
    return isinstance(x, QuantArray)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "index"], meta_fields=[])
@dataclasses.dataclass
class LayerOf:
    """Layer `index` ([] int32, traced in a scan body) of a stacked weight (a QuantArray with parts [L, ...], or a
    float array [L, ...]), not sliced out: a CPU kernel reads that layer where the stack lies. XLA:CPU copies a sliced
    operand of a custom call first (a 49152 x 576 q4_0 matvec: 4.37 ms on a scanned slice, 1.49 ms on the array).
    XLA's path slices it (`sliced`)."""

    stack: QuantArray | jax.Array
    index: jax.Array

    def sliced(self) -> QuantArray | jax.Array:
        def take(p):
            return jax.lax.dynamic_index_in_dim(p, self.index, 0, keepdims=False)

        return self.stack.map_parts(take) if is_quant(self.stack) else take(self.stack)

    def shaped(self) -> QuantArray | jax.ShapeDtypeStruct:
        """One layer's shapes and dtypes (nothing read): what einsum checks."""
        def one(p):
            return jax.ShapeDtypeStruct(p.shape[1:], p.dtype)

        return self.stack.map_parts(one) if is_quant(self.stack) else one(self.stack)


def kernel_reads(w, matmul: str | None, rows: int) -> bool:
    """Whether a CPU kernel contracts this weight (one layer's, or a stack's: its layers') at `rows` rows of
    activations: a QuantArray through the quantized matmul (kernel_activations), a float32 array through the float
    one (float_kernel)."""
    if is_quant(w):
        return kernel_activations(w, matmul, rows) is not None
    return float_kernel(w, matmul, rows)


def _one_layer(w):
    """(w as einsum checks it: one layer's QuantArray, or its shapes for a LayerOf; the LayerOf or None)."""
    return (w.shaped(), w) if isinstance(w, LayerOf) else (w, None)


def dequantize_storage(w: QuantArray) -> jax.Array:
    """-> [*lead, *out, C] in w.dtype: the stored layout, float."""
    return w.spec.decode(w.parts).astype(w.dtype)


def dequantize(w) -> jax.Array:
    """A QuantArray -> the float array of its logical shape (a float array: itself)."""
    if not is_quant(w):
        return w
    x = dequantize_storage(w)  # [*lead, *out, C]
    lead, out, contract = w.lead_ndim, w.out_ndim, 1 + len(w.contract_inner)
    x = x.reshape(*x.shape[:-1], *w.contract_shape)  # [*lead, *out, *contracted]
    if not w.contract_first:
        return x
    order = (*range(lead), *range(lead + out, lead + out + contract), *range(lead, lead + out))
    return x.transpose(order)


def check_quantized_matmul(matmul) -> str | None:
    """The quantized_matmul value, or a ValueError naming it."""
    if matmul is not None and matmul not in QUANTIZED_MATMULS:
        raise ValueError(f"quantized_matmul={matmul!r} must be one of {QUANTIZED_MATMULS} or None")
    return matmul


# Past this many rows of activations (a prefill chunk, a scored window), XLA's dequantize-and-dot contracts a
# quantized weight instead of the CPU kernel: an f32 sgemm over the layer's weights dequantized as the layer runs
# outran the kernel's int16 tiles there. Measured on the default model (Q4_1, 2 cores, 2026-12-03, generate's prefill
# of one prompt, interleaved): 64 rows 146-149 ms through the kernel vs 170-189 through XLA; 128 rows 321-336 vs
# 274-290; 256 rows 663-673 vs 501-518.
KERNEL_MAX_ROWS = 64


def kernel_activations(w, matmul: str | None, rows: int | None = None) -> str | None:
    """How the CPU kernel takes this contraction's activations ("int16" / "float32" / "int8"), or None for XLA's path.
    None (the default) picks "kernel" (int16 activations) on the CPU where the kernels built and hold w's
    layout; an explicit "kernel..." on a layout the kernel lacks also falls back to XLA (the same
    function), but off the CPU, or where the kernels did not build, it is a ValueError. rows: how many rows of
    activations meet w (static); more than KERNEL_MAX_ROWS go to XLA's path, except under "kernel-int8"."""
    if not is_quant(w) or matmul == "xla":
        return None
    on_cpu = jax.default_backend() == "cpu"
    if matmul is None:
        if not (on_cpu and cpu_kernels.available()):
            return None
        matmul = "kernel"
    elif not on_cpu:
        raise ValueError(f"quantized_matmul={matmul!r} runs on the CPU only (the backend is {jax.default_backend()})")
    elif not cpu_kernels.available():
        raise ValueError(f"quantized_matmul={matmul!r}: the CPU kernels are unavailable: "
                         f"{cpu_kernels.unavailable_reason()}")
    if w.layout not in cpu_qmatmul.LAYOUTS:
        return None
    if matmul != "kernel-int8" and rows is not None and rows > KERNEL_MAX_ROWS:
        return None  # kernel-int8 keeps its rounding at every size (llama.cpp's arithmetic, whatever the batch)
    return KERNEL_ACTIVATIONS[matmul]


# Float32 weights through the CPU kernel (cpu_kernels.fmatmul) up to this many rows of activations; XLA's dot from
# there on. Measured on the default model's shapes (2 cores, AVX2): see profiles/README.md.
FLOAT_KERNEL_MAX_ROWS = 16


def float_kernel(w, matmul: str | None, rows: int | None) -> bool:
    """Whether the CPU kernel contracts this float weight: float32, on the CPU where the kernels built, at most
    FLOAT_KERNEL_MAX_ROWS rows of activations, and `matmul` (Runtime.quantized_matmul) not "xla"."""
    return (matmul != "xla" and w.dtype == jnp.float32 and rows is not None and rows <= FLOAT_KERNEL_MAX_ROWS
            and jax.default_backend() == "cpu" and cpu_kernels.available())


def einsum(spec: str, x: jax.Array, w, *, matmul: str | None = None, **kwargs) -> jax.Array:
    """jnp.einsum(spec, x, w) for a float w or a QuantArray w (its logical layout in spec; no lead axis), or a
    LayerOf (one layer of a stack: the kernel reads it in place, XLA's path slices it).

    Several contracted dims are flattened into one first (wo's "BTNH,NHD->BTD" is one [.., N*H] x [N*H, D] dot:
    contracting two dims made XLA:CPU transpose-copy the weight every step). A QuantArray goes to the CPU kernel
    where `matmul` (Runtime.quantized_matmul) and kernel_activations say so; otherwise it is dequantized in its
    stored layout and contracted there (XLA's dequantize-and-dot), never held dequantized past its dot."""
    lhs, rhs, out, contracted = _spec_parts(spec)
    w, of = _one_layer(w)
    if not is_quant(w):
        return _float_einsum(lhs, rhs, out, contracted, x, w, of, matmul, kwargs)
    if w.lead_ndim:
        raise ValueError(f"einsum takes one layer's weight, got a stacked {w.layout} of shape {w.shape}")
    expected = _stored_contraction(w, rhs, contracted)
    if expected != contracted or len(contracted) != 1 + len(w.contract_inner):
        raise ValueError(f"einsum {spec!r}: {w.layout} weight {w.shape} contracts {expected!r}, not {contracted!r}")
    x, lhs = _merge(x, lhs, contracted)
    activations = kernel_activations(w, matmul, _rows(x, lhs, contracted[0]))
    if activations is not None:
        dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
        return _kernel_einsum(lhs, rhs.replace(contracted, ""), contracted[0], out, x, w, of, activations, dtype)
    if of is not None:
        w = of.sliced()
    spec = f"{lhs},{rhs.replace(contracted, '')}{contracted[0]}->{out}"  # w as stored: the out letters, then C
    if w.spec.decode_halves is None:
        return jnp.einsum(spec, x, dequantize_storage(w), **kwargs)
    # Nibble layouts: x's codes of each run of 32 split as the bytes hold them, [..., C / 32, 2, 16] -> two
    # [..., C / 2] halves, each contracted with its nibbles (XLA:CPU interleaving the nibbles back costs ~3x).
    at = x.ndim + lhs.index(contracted[0]) - len(lhs)  # from the end: lhs may start with "..."
    runs = x.reshape(*x.shape[:at], -1, 2, 16, *x.shape[at + 1 :])
    halves = [jnp.take(runs, i, axis=at + 1).reshape(*x.shape[:at], -1, *x.shape[at + 1 :]) for i in (0, 1)]
    weights = [h.astype(w.dtype) for h in w.spec.decode_halves(w.parts)]
    return sum(jnp.einsum(spec, xh, wh, **kwargs) for xh, wh in zip(halves, weights))


def _float_einsum(lhs: str, rhs: str, out: str, contracted: str, x: jax.Array, w, of: LayerOf | None, matmul, kwargs):
    """einsum of a float weight (w one layer's, or its shapes when of holds the stack): several contracted dims merged
    into one, then the CPU kernel where float_kernel says so and w holds them first or last, else XLA's dot."""
    x, lhs = _merge(x, lhs, contracted)
    c, at = contracted[0], rhs.index(contracted)
    w_rhs = rhs.replace(contracted, c)
    merged = (*w.shape[:at], math.prod(w.shape[at : at + len(contracted)]), *w.shape[at + len(contracted) :])
    if (w_rhs[0] == c or w_rhs[-1] == c) and float_kernel(w, matmul, _rows(x, lhs, c)):
        first, w_out = w_rhs[0] == c, w_rhs.replace(c, "")
        out_shape = merged[1:] if first else merged[:-1]
        own = (merged[0], math.prod(out_shape)) if first else (math.prod(out_shape), merged[-1])  # [K, N] / [N, K]
        stack = of.stack.reshape(of.stack.shape[0], *own) if of is not None else w.reshape(own)
        x, x_rest = _contracted_last(lhs, c, x)
        y = cpu_fmatmul.fmatmul(x.astype(jnp.float32), stack, contract_first=first,
                                layer=None if of is None else of.index)  # [..., N]
        dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
        return _kernel_result(y, out_shape, x_rest, w_out, out, dtype)
    if of is not None:
        w = of.sliced()
    return jnp.einsum(f"{lhs},{w_rhs}->{out}", x, w.reshape(merged), **kwargs)


def _spec_parts(spec: str) -> tuple[str, str, str, str]:
    """"lhs,rhs->out" -> (lhs, rhs, out, the letters rhs contracts with lhs)."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out, "".join(c for c in rhs if c in lhs and c not in out)


def _stored_contraction(w: QuantArray, rhs: str, contracted: str) -> str:
    """The letters of rhs that w's storage contracts: its first or its last len(contracted)."""
    return rhs[: len(contracted)] if w.contract_first else rhs[len(rhs) - len(contracted) :]


def _kernel_einsum(lhs: str, w_out: str, c: str, out: str, x: jax.Array, w: QuantArray, of: LayerOf | None,
                   activations: str, dtype):
    """x (subscripts lhs, contracting the one letter c) against w stored [*w_out, C] (or layer of.index of of.stack),
    through the CPU kernel: x's c moved last, w's out dims flattened to the kernel's N, the result's letters put in
    out's order."""
    x, x_rest = _contracted_last(lhs, c, x)
    parts, layer = _kernel_parts(w, of)
    y = cpu_qmatmul.qmatmul(x, w.layout, parts, layer=layer, activations=activations)  # [..., N] float32
    return _kernel_result(y, w.out_shape, x_rest, w_out, out, dtype)


def _contracted_last(lhs: str, c: str, x: jax.Array) -> tuple[jax.Array, str]:
    """x with its contracted letter c moved last, and its other letters in order."""
    x_rest = lhs.replace(c, "")
    return (x if lhs.endswith(c) else jnp.einsum(f"{lhs}->{x_rest}{c}", x)), x_rest


def _kernel_parts(w: QuantArray, of: LayerOf | None = None) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """(w's parts [*out, n] -> [N, n], the kernel's rows; None), or for a LayerOf (its stack's parts [L, N, n], its
    index)."""
    rows = math.prod(w.out_shape)
    if of is None:
        return {name: p.reshape(rows, p.shape[-1]) for name, p in w.parts.items()}, None
    return {name: p.reshape(p.shape[0], rows, p.shape[-1]) for name, p in of.stack.parts.items()}, of.index


def _kernel_result(y: jax.Array, out_shape: tuple[int, ...], x_rest: str, w_out: str, out: str, dtype) -> jax.Array:
    """A kernel's y [..., N] -> the weight's out dims (out_shape, letters w_out) unflattened, in out's letter order,
    as dtype."""
    y = y.reshape(*y.shape[:-1], *out_shape).astype(dtype)
    return y if f"{x_rest}{w_out}" == out else jnp.einsum(f"{x_rest}{w_out}->{out}", y)


def einsums(specs: list[str], x: jax.Array, ws: list, *, matmul: str | None = None, **kwargs) -> list[jax.Array]:
    """[einsum(spec, x, w, matmul=matmul) for spec, w in zip(specs, ws)] (a layer's q, k, v; its gate and up). Where
    a CPU kernel contracts every w the same way (quantized: one layout, x's same contracted letter, the same
    activations; float32: each w's contracted dims first): one kernel call for all of them (x quantized once, one
    hand-off to the threads; decode makes hundreds of calls a token). Otherwise one einsum each."""
    floats = _fused_float_call(specs, x, ws, matmul, kwargs)
    if floats is not None:
        return floats
    fused = _fused_kernel_call(specs, x, ws, matmul)
    if fused is None:
        return [einsum(spec, x, w, matmul=matmul, **kwargs) for spec, w in zip(specs, ws)]
    x, x_lhs, c, activations, outs = fused
    x, x_rest = _contracted_last(x_lhs, c, x)
    layers = [_one_layer(w) for w in ws]
    parts = [_kernel_parts(w, of) for w, of in layers]
    ys = cpu_qmatmul.qmatmul_many(x, layers[0][0].layout, [p for p, _ in parts], layer=parts[0][1],
                                  activations=activations)
    results = []
    for y, (w, _), (w_out, out) in zip(ys, layers, outs):
        dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
        results.append(_kernel_result(y, w.out_shape, x_rest, w_out, out, dtype))
    return results


def _fused_float_call(specs, x, ws, matmul, kwargs) -> list[jax.Array] | None:
    """einsums' results through one cpu_fmatmul.fmatmul_many call where every w is float32 (one layer's, or LayerOfs
    of one index), contracted first against x's same letters, and float_kernel takes them; else None."""
    layers = [_one_layer(w) for w in ws]
    if len(ws) < 2 or any(is_quant(w) for w, _ in layers):
        return None
    ofs = [of for _, of in layers]
    if any((of is None) != (ofs[0] is None) or (of is not None and of.index is not ofs[0].index) for of in ofs):
        return None
    parsed = [_spec_parts(spec) for spec in specs]
    lhs, _, _, contracted = parsed[0]
    if any((p[0], p[3]) != (lhs, contracted) or not p[1].startswith(contracted) for p in parsed):
        return None
    merged, merged_lhs = _merge(x, lhs, contracted)
    if not all(float_kernel(w, matmul, _rows(merged, merged_lhs, contracted[0])) for w, _ in layers):
        return None
    x2, x_rest = _contracted_last(merged_lhs, contracted[0], merged)
    stacks, outs = [], []
    for (w, of), (_, rhs, out, _) in zip(layers, parsed):
        k = math.prod(w.shape[: len(contracted)])
        own = (k, math.prod(w.shape[len(contracted) :]))  # [K, N]
        stacks.append(w.reshape(own) if of is None else of.stack.reshape(of.stack.shape[0], *own))
        outs.append((w.shape[len(contracted) :], rhs[len(contracted) :], out))
    ys = cpu_fmatmul.fmatmul_many(x2.astype(jnp.float32), stacks, layer=None if ofs[0] is None else ofs[0].index)
    results = []
    for y, (w, _), (out_shape, w_out, out) in zip(ys, layers, outs):
        dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, w.dtype)
        results.append(_kernel_result(y, out_shape, x_rest, w_out, out, dtype))
    return results


def _fused_kernel_call(specs, x, ws, matmul):
    """(x with its contracted dims merged, its subscripts, the contracted letter, activations, [(w's out letters,
    out)] per weight) where one kernel call can contract x with every w (see einsums); else None."""
    if len(ws) < 2 or len({type(w) for w in ws}) != 1 or not isinstance(ws[0], (QuantArray, LayerOf)):
        return None
    if isinstance(ws[0], LayerOf) and any(w.index is not ws[0].index for w in ws):
        return None  # one call reads one layer of every stack, by the one index
    ws = [_one_layer(w)[0] for w in ws]
    if not all(is_quant(w) and not w.lead_ndim for w in ws):
        return None  # float weights: one einsum each
    parsed = []
    for spec, w in zip(specs, ws):
        lhs, rhs, out, contracted = _spec_parts(spec)
        if _stored_contraction(w, rhs, contracted) != contracted or len(contracted) != 1 + len(w.contract_inner):
            return None  # einsum names the mismatch
        parsed.append((lhs, contracted, rhs.replace(contracted, ""), out))
    lhs, contracted = parsed[0][:2]
    if any((p[0], p[1]) != (lhs, contracted) for p in parsed) or len({(w.layout, w.contraction) for w in ws}) != 1:
        return None
    merged, merged_lhs = _merge(x, lhs, contracted)
    activations = {kernel_activations(w, matmul, _rows(merged, merged_lhs, contracted[0])) for w in ws}
    if len(activations) != 1 or None in activations:
        return None
    return merged, merged_lhs, contracted[0], activations.pop(), [(w_out, out) for _, _, w_out, out in parsed]


MAX_DEQUANTIZED_ELEMENTS = 1 << 24  # einsum_by_rows: float32 elements of one chunk dequantized at a time (64 MB)


def einsum_by_rows(spec: str, x: jax.Array, w, *, matmul: str | None = None, **kwargs) -> jax.Array:
    """einsum(spec, x, w) for a weight with one out dim (the lm_head / tied embedding, [V, D] stored): a QuantArray
    of more than MAX_DEQUANTIZED_ELEMENTS is contracted a chunk of out rows at a time in a loop, so one chunk is
    dequantized at once, not the whole (Llama 3's 128256 x 4096 head: 2.1 GB of float32 a step). Float: einsum."""
    x_rows = x.size // x.shape[-1] if is_quant(w) else None  # x [..., D]: the head contracts x's last dim
    if not is_quant(w) or w.out_ndim != 1 or w.lead_ndim or kernel_activations(w, matmul, x_rows) is not None:
        return einsum(spec, x, w, matmul=matmul, **kwargs)  # the kernel dequantizes nothing
    rows, contraction = w.out_shape[0], w.contraction
    chunks = next((n for n in range(1, rows + 1) if rows % n == 0 and rows // n * contraction <= MAX_DEQUANTIZED_ELEMENTS),
                  rows)
    if chunks == 1:
        return einsum(spec, x, w, matmul="xla", **kwargs)
    lhs, rhs, out, _ = _spec_parts(spec)
    letter = "".join(c for c in rhs if c not in lhs)  # w's out letter (V)
    assert len(letter) == 1 and out.endswith(letter), spec
    stacked = w.map_parts(lambda p: p.reshape(chunks, rows // chunks, *p.shape[1:]))  # [chunks, V / chunks, n]
    parts = jax.lax.map(lambda c: einsum(spec, x, dataclasses.replace(w, parts=c), matmul="xla", **kwargs),
                        stacked.parts)
    return jnp.moveaxis(parts, 0, -2).reshape(*parts.shape[1:-1], rows)  # [chunks, ..., V / chunks] -> [..., V]


def _rows(x: jax.Array, subscripts: str, letter: str) -> int:
    """How many rows of activations x holds: its size over its contracted dim `letter`'s."""
    at = x.ndim + subscripts.index(letter) - len(subscripts)  # from the end: subscripts may start with "..."
    return x.size // max(1, x.shape[at])


def _merge(x: jax.Array, subscripts: str, letters: str) -> tuple[jax.Array, str]:
    """x's adjacent dims `letters` (in that order in subscripts) -> one dim named letters[0]."""
    if len(letters) == 1:
        return x, subscripts
    at = x.ndim + subscripts.index(letters) - len(subscripts)  # from the end: subscripts may start with "..."
    x = x.reshape(*x.shape[:at], -1, *x.shape[at + len(letters) :])
    return x, subscripts.replace(letters, letters[0])


def take(w, indices: jax.Array) -> jax.Array:
    """Rows of an embedding [V, D] (float or QuantArray) -> [*indices.shape, D]: only the gathered rows dequantized."""
    if not is_quant(w):
        return w[indices]
    assert not w.contract_first and w.out_ndim == 1 and w.lead_ndim == 0, w
    return dequantize_storage(w.map_parts(lambda p: p[indices]))


def after(tree, x: jax.Array, matmul: str | None = None):
    """tree's QuantArrays, tied to x: their dequantization cannot be scheduled before x exists. XLA:CPU hoisted
    every layer's weight conversion to the start of an unrolled program (the whole float model in temporaries on
    every call; an optimization_barrier did not stop it): each QuantArray's scales get a zero computed from x's
    first element's sign bit, a data dependency no pass folds, so each layer's weights are dequantized as it runs.
    A weight the CPU kernel contracts (kernel_activations under `matmul`) is never dequantized: left as it is (the
    tie would copy its scales every step)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_quant)
    rows = x.size // x.shape[-1]  # the layer's input [..., D]: every projection of the layer meets as many rows
    tied = [is_quant(leaf) and kernel_activations(leaf, matmul, rows) is None for leaf in leaves]
    if not any(tied):
        return tree
    sign = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32) >> 31  # [] 0 or 1
    zero = jnp.minimum(sign, 0)

    def tie(w: QuantArray) -> QuantArray:
        return dataclasses.replace(w, parts={**w.parts, "scales": w.parts["scales"] + zero.astype(w.parts["scales"].dtype)})

    return jax.tree.unflatten(treedef, [tie(leaf) if t else leaf for leaf, t in zip(leaves, tied)])


# --------------------------------------------------------------------------------------------
# Shapes, checks and quantization (host side, numpy: one tensor at a time)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a weight contracts, declared with it (model.TensorSpec): its first `contract_ndim` own dims
    (contract_first) or its last ones."""

    contract_ndim: int
    contract_first: bool = True

    def split(self, own_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """-> (out dims, contracted dims) of a weight's own (unstacked) shape."""
        n = self.contract_ndim
        if self.contract_first:
            return own_shape[n:], own_shape[:n]
        return own_shape[: len(own_shape) - n], own_shape[len(own_shape) - n :]


def check_contraction(layout: str, contraction: int, what: str) -> None:
    """ValueError unless `layout` can hold a contraction axis of this size (whole blocks, whole bytes)."""
    multiple = LAYOUTS[layout].multiple
    if contraction % multiple:
        raise ValueError(f"{what}: its contraction axis of {contraction} is not a multiple of {multiple}, "
                         f"the block of {layout}")


def part_shapes(layout: str, out_shape: tuple[int, ...], contraction: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape [*out, n], dtype) of each part of a layout holding [*out, contraction]."""
    return {p.name: ((*out_shape, 1 if p.per is None else contraction // p.per), p.dtype) for p in LAYOUTS[layout].parts}


def abstract(layout: str, shape: tuple[int, ...], geometry: Geometry, dtype: str, lead_ndim: int = 0) -> QuantArray:
    """A QuantArray of ShapeDtypeStructs for a weight of logical shape `shape` (lead dims first)."""
    lead, (out, contracted) = shape[:lead_ndim], geometry.split(shape[lead_ndim:])
    check_contraction(layout, math.prod(contracted), f"{layout} for a {'x'.join(map(str, shape))} weight")
    parts = {name: jax.ShapeDtypeStruct((*lead, *s), _DTYPES[d])
             for name, (s, d) in part_shapes(layout, out, math.prod(contracted)).items()}
    return QuantArray(parts, layout, len(out), geometry.contract_first, tuple(contracted[1:]), dtype)


def random(shape: QuantArray, key: jax.Array, scale: float) -> QuantArray:
    """Random codes and scales in shape's layout (a QuantArray of ShapeDtypeStructs), drawn in place: weights of
    about `scale` in size whose float32 copy never exists (benchmarks: speed does not depend on the values)."""
    keys = dict(zip(shape.parts, jax.random.split(key, len(shape.parts))))
    # A code's typical size per layout, so that scale * code ~ `scale`: uniform int8 ~73, 4-bit codes 0..15
    # ~4.6 around a min of -7.5 steps, fp8 bit patterns below 2.0 (exponent's top bit cleared: no NaN) ~0.5.
    typical = {"int8_channel": 73.0, "q8_0": 73.0, "fp8_channel": 0.5}.get(shape.layout, 4.6)

    def draw(name: str, part: jax.ShapeDtypeStruct) -> jax.Array:
        if name == "values" and part.dtype == jnp.int8:
            return jax.lax.bitcast_convert_type(_hashed_bytes(keys[name], part.shape), jnp.int8)
        if name == "values" and part.dtype == ml_dtypes.float8_e4m3fn:
            return jax.lax.bitcast_convert_type(_hashed_bytes(keys[name], part.shape) & 0xBF, part.dtype)
        if part.dtype == jnp.uint8:
            return _hashed_bytes(keys[name], part.shape)
        value = -7.5 * scale / typical if name == "mins" else scale / typical
        return jnp.full(part.shape, value, part.dtype)

    return dataclasses.replace(shape, parts={name: draw(name, part) for name, part in shape.parts.items()})


def held_bytes(tree) -> int:
    """Bytes of a pytree's arrays as held: a QuantArray's parts, a float array's elements."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quant)
    return sum(leaf.nbytes if is_quant(leaf) else int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in leaves)


@functools.partial(jax.jit, static_argnums=1)
def _hashed_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Pseudo-random uint8 [shape]: each element's index hashed with a seed drawn from key, in one fused loop.
    jax.random.bits of a [128256, 2048] uint8 array peaked at 5.2 GB (its 32-bit counters and words); this writes
    only the bytes."""
    seed = jax.random.bits(key, (), jnp.uint32)
    x = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) ^ seed
    x = x * jnp.uint32(0x9E3779B1)
    x = (x ^ (x >> 15)) * jnp.uint32(0x85EBCA77)
    return (x ^ (x >> 13)).astype(jnp.uint8)


def dequantize_tree(tree):
    """Every QuantArray of a pytree (Params) dequantized: the float model the quantized one computes."""
    return jax.tree.map(dequantize, tree, is_leaf=is_quant)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., C] codes 0..15 -> [..., C / 2] uint8 (the inverse of nibbles)."""
    runs = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, 2, 16)
    return (runs[..., 0, :] | (runs[..., 1, :] << 4)).reshape(*codes.shape[:-1], -1)


def pack_bits(codes: np.ndarray, width: int) -> np.ndarray:
    """[..., C] codes of `width` bits -> [..., C * width / 8] uint8 (the inverse of bit_planes)."""
    per = 8 // width
    groups = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = np.arange(0, 8, width, dtype=np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=-1).astype(np.uint8)


def quantize_storage(w: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """A float weight in stored layout [..., C] -> its parts in `layout` (q8_0, int8_channel, fp8_channel,
    int4_g*_min)."""
    w = np.asarray(w, np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"cannot quantize to {layout}: the weight holds non-finite values")
    if layout in ("int8_channel", "fp8_channel"):
        top = 127.0 if layout == "int8_channel" else float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
        amax = np.max(np.abs(w), axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)  # [..., 1]
        if layout == "int8_channel":
            values = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        else:
            values = (w / scale).astype(ml_dtypes.float8_e4m3fn)
        return {"values": values, "scales": scale}
    spec = LAYOUTS[layout]
    if layout == "q8_0":  # GGUF's Q8_0: int8 codes, a float16 scale per 32
        blocks = w.reshape(*w.shape[:-1], -1, spec.block)  # [..., C / 32, 32]
        scale = (np.max(np.abs(blocks), axis=-1) / 127).astype(np.float16)  # [..., C / 32]
        if not np.all(np.isfinite(scale)):
            raise ValueError(f"cannot quantize to {layout}: a block's range overflows float16")
        s32 = scale.astype(np.float32)[..., None]  # codes against the scale as stored
        codes = np.where(s32 > 0, np.rint(blocks / np.where(s32 > 0, s32, 1)), 0)
        return {"values": np.clip(codes, -127, 127).astype(np.int8).reshape(w.shape), "scales": scale}
    if not layout.startswith("int4_g"):
        raise ValueError(f"quantizing to {layout} is not supported (only {sorted(set(MODES.values()))})")
    blocks = w.reshape(*w.shape[:-1], -1, spec.block)  # [..., C / g, g]
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    # The float16 scale and min as stored, then codes against them: what dequantization will multiply.
    scale = ((high - low) / 15).astype(np.float16)
    mins = low.astype(np.float16)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(mins))):
        raise ValueError(f"cannot quantize to {layout}: a group's range overflows float16")
    s32 = scale.astype(np.float32)[..., None]
    codes = np.where(s32 > 0, np.rint((blocks - mins.astype(np.float32)[..., None]) / np.where(s32 > 0, s32, 1)), 0)
    codes = np.clip(codes, 0, 15).reshape(w.shape)
    return {"values": pack_nibbles(codes), "scales": scale, "mins": mins}


def quantize(w, layout: str, geometry: Geometry, dtype: str, lead_ndim: int = 0) -> QuantArray:
    """A float weight of logical shape [*lead, *own] -> a QuantArray (numpy parts) in `layout`, on the host."""
    w = np.asarray(w, np.float32)
    lead, own = w.shape[:lead_ndim], w.shape[lead_ndim:]
    out, contracted = geometry.split(own)
    n = len(contracted)
    if geometry.contract_first:  # [*lead, *contracted, *out] -> [*lead, *out, *contracted]
        w = w.transpose(*range(lead_ndim), *range(lead_ndim + n, w.ndim), *range(lead_ndim, lead_ndim + n))
    storage = w.reshape(*lead, *out, math.prod(contracted))
    return from_parts(quantize_storage(storage, layout), layout, own, geometry, dtype)


def from_parts(parts: dict, layout: str, own_shape: tuple[int, ...], geometry: Geometry, dtype: str) -> QuantArray:
    """Parts ([*lead, *out, n] each, e.g. from a loader) of a weight whose per-layer logical shape is own_shape."""
    out, contracted = geometry.split(own_shape)
    return QuantArray(dict(parts), layout, len(out), geometry.contract_first, tuple(contracted[1:]), dtype)
