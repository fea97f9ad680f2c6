"""jaxinfer.quant: GGUF blocks kept bit-exact, quantization error bounds, einsum and take against dequantize."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer import model as model_lib
from jaxinfer import quant
from jaxinfer.checkpoints import gguf_blocks

T = gguf.GGMLQuantizationType


def _random_blocks(rng, type_name: str, rows: int, blocks: int) -> np.ndarray:
    """Random bytes of a GGUF type [rows, blocks * block bytes], every float16 field a finite value of either
    sign (edge values included: zero, the smallest subnormal, the largest finite)."""
    block, size = gguf_blocks._BLOCK[type_name]
    data = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[type_name]
    edges = np.array([0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1.0, -0.5], np.float16)
    for off in offsets:
        d = (rng.standard_normal((rows, blocks)) * 0.05).astype(np.float16)
        d.reshape(-1)[: len(edges)] = edges[: d.size]
        data[..., off : off + 2] = d[..., None].view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, blocks * size)


def _ours(type_name: str, data: np.ndarray) -> np.ndarray:
    parts = {k: jnp.asarray(v) for k, v in gguf_blocks.parts(type_name, data).items()}
    layout = gguf_blocks.KEPT[type_name]
    return np.asarray(jax.jit(lambda p: quant.LAYOUTS[layout].decode(p))(parts))


@pytest.mark.parametrize("type_name", sorted(gguf_blocks.KEPT))
def test_gguf_blocks_dequantize_bit_exact(type_name):
    rng = np.random.default_rng(0)
    data = _random_blocks(rng, type_name, rows=6, blocks=3)
    expected = gguf.quants.dequantize(data, T[type_name])  # [rows, blocks * block]
    got = _ours(type_name, data)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # bit for bit, -0.0 included


@pytest.mark.parametrize("type_name", sorted(gguf_blocks.KEPT))
def test_gguf_blocks_extreme_codes(type_name):
    """All-zero and all-ones code bytes (min and max codes, every high bit set), negative mins, zero scales."""
    rng = np.random.default_rng(1)
    data = _random_blocks(rng, type_name, rows=2, blocks=2).reshape(2, 2, -1)
    _, size = gguf_blocks._BLOCK[type_name]
    keep = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q5_0": (0, 2), "Q5_1": (0, 4), "Q4_K": (0, 16), "Q5_K": (0, 16), "Q6_K": (192, 210)}
    lo, hi = keep[type_name]
    code_bytes = np.ones(size, bool)
    code_bytes[lo:hi] = False
    data[0][:, code_bytes] = 0x00
    data[1][:, code_bytes] = 0xFF
    data = data.reshape(2, -1)
    expected = gguf.quants.dequantize(data, T[type_name])
    np.testing.assert_array_equal(_ours(type_name, data).view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_quantized_real_values(type_name):
    """Blocks as gguf's own quantizer writes them from a Gaussian tensor."""
    w = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    data = gguf.quants.quantize(w, T[type_name])
    np.testing.assert_array_equal(_ours(type_name, data), gguf.quants.dequantize(data, T[type_name]))


def test_nibble_and_bit_packing_round_trip():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (3, 64))
    np.testing.assert_array_equal(np.asarray(quant.nibbles(jnp.asarray(quant.pack_nibbles(codes)))), codes)
    for width in (1, 2):
        bits = rng.integers(0, 2**width, (3, 64))
        np.testing.assert_array_equal(np.asarray(quant.bit_planes(jnp.asarray(quant.pack_bits(bits, width)), width)),
                                      bits)


# ---------------------------------------------------------------------------------------------
# Quantization at load: error bounds


def _round_trip(layout: str, w: np.ndarray) -> np.ndarray:
    parts = {k: jnp.asarray(v) for k, v in quant.quantize_storage(w, layout).items()}
    return np.asarray(quant.LAYOUTS[layout].decode(parts))


def test_int8_channel_rmse_is_the_uniform_step():
    """Rounding to a step s leaves an error uniform in [-s/2, s/2]: RMSE s / sqrt(12), per row."""
    w = np.random.default_rng(4).standard_normal((64, 4096)).astype(np.float32)
    err = _round_trip("int8_channel", w) - w
    step = np.abs(w).max(axis=1) / 127
    rmse = np.sqrt(np.mean(err**2, axis=1))
    np.testing.assert_allclose(rmse, step / np.sqrt(12), rtol=0.01 * 3)  # 1% in the mean over rows, 3% per row
    assert abs(np.mean(rmse / (step / np.sqrt(12))) - 1) < 0.01
    assert np.all(np.abs(err) <= step[:, None] / 2 * (1 + 1e-5))  # float32 rounding of w / s and s * q


def test_q8_0_error_within_half_a_step_and_readable_by_gguf():
    """quantize="int8" (q8_0): every weight within half its block's step (the float16 scale as stored; a code
    clipped at 127 where rounding the scale to float16 shrank it costs at most 127 * its rounding); the parts
    are GGUF Q8_0 blocks that gguf.quants dequantizes to the same values."""
    gguf = pytest.importorskip("gguf")
    w = np.random.default_rng(6).standard_normal((16, 1024)).astype(np.float32)
    parts = quant.quantize_storage(w, "q8_0")
    got = _round_trip("q8_0", w)
    step = np.repeat(parts["scales"].astype(np.float32), 32, axis=1)
    assert np.all(np.abs(got - w) <= step * (0.5 + 127 * 2.0**-11))
    assert np.abs(np.abs(w).reshape(16, -1, 32).max(-1) - 127 * parts["scales"].astype(np.float32)).max() < 0.01
    blocks = np.concatenate([parts["scales"].view(np.uint8).reshape(16, -1, 2),
                             parts["values"].view(np.uint8).reshape(16, -1, 32)], axis=-1)  # ggml's block_q8_0
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks.reshape(16, -1), gguf.GGMLQuantizationType.Q8_0), got)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_group_error_within_half_a_step(group):
    w = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32)
    layout = f"int4_g{group}_min"
    got = _round_trip(layout, w)
    blocks = w.reshape(16, -1, group)
    step = ((blocks.max(-1) - blocks.min(-1)) / 15).astype(np.float16).astype(np.float32)
    # half a step of rounding, plus the float16 min's and step's own rounding carried over up to 15 steps
    bound = step / 2 + np.abs(blocks.min(-1)) * 2**-11 + 15 * step * 2**-11
    assert np.all(np.abs(got - w).reshape(16, -1, group) <= bound[..., None] * (1 + 1e-5))
    assert np.sqrt(np.mean((got - w) ** 2)) < 0.6 * np.mean(step)  # ~ step / sqrt(12) = 0.29 step


def test_fp8_channel_relative_error():
    w = np.random.default_rng(6).standard_normal((32, 512)).astype(np.float32)
    got = _round_trip("fp8_channel", w)
    scale = np.abs(w).max(axis=1, keepdims=True) / 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normals, absolute 2**-10 * scale below them
    assert np.all(np.abs(got - w) <= np.maximum(np.abs(w) * 2**-4, scale * 2**-10) * (1 + 1e-6))


def test_quantize_edge_cases():
    zeros = np.zeros((2, 64), np.float32)
    for layout in ("q8_0", "int8_channel", "fp8_channel", "int4_g32_min"):
        np.testing.assert_array_equal(_round_trip(layout, zeros), zeros)
    constant = np.full((2, 64), 0.25, np.float32)
    np.testing.assert_allclose(_round_trip("int4_g32_min", constant), constant)
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize_storage(np.array([[np.nan] * 32], np.float32), "int8_channel")
    with pytest.raises(ValueError, match="q4_k"):
        quant.quantize_storage(np.zeros((1, 256), np.float32), "q4_k")


def test_check_contraction_names_the_block():
    quant.check_contraction("int4_g128_min", 256, "w_down")
    with pytest.raises(ValueError, match=r"w_down: its contraction axis of 96 is not a multiple of 128, the block of "
                                         r"int4_g128_min"):
        quant.check_contraction("int4_g128_min", 96, "w_down")
    with pytest.raises(ValueError, match="quantize='int3'"):
        quant.check_quantize("int3")


# ---------------------------------------------------------------------------------------------
# The array: shapes, dequantize, einsum, take


def _quant_array(layout, own_shape, geometry, lead=(), seed=0):
    """A QuantArray of random weights with logical shape lead + own_shape, and its float reference."""
    out, contracted = geometry.split(own_shape)
    C = int(np.prod(contracted))
    storage = np.random.default_rng(seed).standard_normal((*lead, *out, C)).astype(np.float32)
    parts = {k: jnp.asarray(v) for k, v in quant.quantize_storage(storage, layout).items()}
    w = quant.from_parts(parts, layout, own_shape, geometry, "float32")
    return w


def _assert_einsum(spec, x, w, ref):
    """quant.einsum(spec, x, w) against the float einsum ref: XLA's dequantize-and-dot up to float rounding; the
    default (on the CPU the kernel, activations rounded to 16 bits per block of 32) within that rounding."""
    for matmul, tolerance in (("xla", 1e-5), (None, 1e-3)):
        got = quant.einsum(spec, x, w, matmul=matmul, precision="highest")
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=tolerance, atol=tolerance, err_msg=matmul)


@pytest.mark.parametrize("layout", ["q8_0", "int8_channel", "fp8_channel", "int4_g32_min", "int4_g64_min"])
def test_einsum_equals_dequantized_einsum(layout):
    D, N, H = 128, 4, 32
    first = quant.Geometry(1)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, D)), jnp.float32)
    wq = _quant_array(layout, (D, N, H), first)
    assert wq.shape == (D, N, H)
    _assert_einsum("BTD,DNH->BTNH", x, wq, jnp.einsum("BTD,DNH->BTNH", x, quant.dequantize(wq), precision="highest"))
    # wo: two contracted dims, flattened
    wo = _quant_array(layout, (N, H, D), quant.Geometry(2))
    assert wo.shape == (N, H, D) and wo.contract_inner == (H,)
    o = jnp.asarray(np.random.default_rng(8).standard_normal((2, 3, N, H)), jnp.float32)
    _assert_einsum("BTNH,NHD->BTD", o, wo, jnp.einsum("BTNH,NHD->BTD", o, quant.dequantize(wo), precision="highest"))
    with pytest.raises(ValueError, match="contracts"):
        quant.einsum("BTN,NHD->BTHD", o[..., 0], wo)


def test_take_and_tied_logits():
    V, D = 64, 96
    embed = _quant_array("int4_g32_min", (V, D), quant.Geometry(1, contract_first=False))
    assert embed.shape == (V, D)
    tokens = jnp.array([[0, 5, 63]])
    np.testing.assert_array_equal(np.asarray(quant.take(embed, tokens)), np.asarray(quant.dequantize(embed)[tokens]))
    h = jnp.asarray(np.random.default_rng(9).standard_normal((1, 3, D)), jnp.float32)
    _assert_einsum("BTD,VD->BTV", h, embed, jnp.einsum("BTD,VD->BTV", h, quant.dequantize(embed), precision="highest"))


def test_stacked_parts_scan_and_unstack():
    """A leading layer axis slices off every part alike: lax.scan over a stacked QuantArray sees one layer's."""
    w = _quant_array("int4_g32_min", (64, 2, 16), quant.Geometry(1), lead=(3,))
    assert w.shape == (3, 64, 2, 16) and w.lead_ndim == 1
    full = quant.dequantize(w)
    x = jnp.ones((1, 1, 64), jnp.float32)

    def body(carry, layer):
        return carry, quant.einsum("BTD,DNH->BTNH", x, layer, precision="highest")

    _, scanned = jax.lax.scan(body, 0, w)
    for i, layer in enumerate(model_lib.unstack_weight(w)):
        np.testing.assert_array_equal(np.asarray(quant.dequantize(layer)), np.asarray(full[i]))
        np.testing.assert_allclose(np.asarray(scanned[i]), np.asarray(jnp.einsum("BTD,DNH->BTNH", x, full[i],
                                                                                precision="highest")), rtol=1e-6)
    restacked = model_lib.stack_weight(model_lib.unstack_weight(w))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(restacked)), np.asarray(full))


def test_abstract_matches_parts():
    w = _quant_array("int4_g64_min", (128, 4, 8), quant.Geometry(1), lead=(2,))
    a = quant.abstract("int4_g64_min", (2, 128, 4, 8), quant.Geometry(1), "float32", lead_ndim=1)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(lambda x: (x.shape, x.dtype), w)
    assert a.shape == w.shape == (2, 128, 4, 8)
    assert w.nbytes == 2 * 4 * 8 * (128 // 2 + 2 * 2 * 128 // 64)
    assert quant.LAYOUTS["q4_k"].bits_per_weight(4096) == pytest.approx(4.625)  # GGUF: 4.5 (6-bit scales packed)
    assert quant.LAYOUTS["q6_k"].bits_per_weight(4096) == pytest.approx(6.5625)
    assert ml_dtypes.float8_e4m3fn  # the fp8 dtype jax and numpy share


@pytest.mark.parametrize("contract_first", [False, True])
def test_einsum_by_rows_equals_einsum(monkeypatch, contract_first):
    """The head contracted a chunk of vocabulary rows at a time equals it whole (embed [V, D] tied, lm_head [D, V])."""
    V, D = 96, 64
    w = _quant_array("int4_g32_min", (D, V) if contract_first else (V, D), quant.Geometry(1, contract_first))
    spec = "...D,DV->...V" if contract_first else "...D,VD->...V"
    h = jnp.asarray(np.random.default_rng(10).standard_normal((2, 3, D)), jnp.float32)
    whole = quant.einsum(spec, h, w, precision="highest")
    monkeypatch.setattr(quant, "MAX_DEQUANTIZED_ELEMENTS", 32 * D)  # 3 chunks of 32 rows
    chunked = jax.jit(lambda h, w: quant.einsum_by_rows(spec, h, w, precision="highest"))(h, w)
    assert chunked.shape == (2, 3, V)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_abstract_refuses_a_contraction_the_layout_cannot_hold():
    with pytest.raises(ValueError, match=r"int4_g128_min for a 49152x576 weight: its contraction axis of 576 is not a "
                                         r"multiple of 128"):
        quant.abstract("int4_g128_min", (49152, 576), quant.Geometry(1, contract_first=False), "float32")
