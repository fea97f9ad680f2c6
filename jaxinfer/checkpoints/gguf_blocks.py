"""GGUF's quantized blocks -> jaxinfer.quant layouts, losslessly: the same codes and scales, repacked.

A GGUF tensor's data is [rows, row bytes], each row a run of blocks along the contraction axis (our stored layout,
jaxinfer.quant). Each function here takes those bytes and returns the parts of the layout that holds the type
exactly; `quant.dequantize` of them equals `gguf.quants.dequantize` of the bytes bit for bit
(tests/test_quant.py, block by block). Codes are unpacked from ggml's arrangement and packed in ours (nibbles in
runs of 32, fifth and sixth bits in bit planes), scales and mins kept as stored.

Byte layouts (ggml-common.h's block_* structs, all little-endian):
- Q8_0 (34 bytes / 32): d f16, qs int8[32]
- Q4_0 (18 / 32): d f16, qs[16] (code i low nibble of byte i, code i + 16 its high one: our order already)
- Q4_1 (20 / 32): d f16, m f16, qs[16]
- Q5_0 (22 / 32): d f16, qh[4] (bit i of the little-endian word: the fifth bit of code i, our bit plane already),
  qs[16] as Q4_0's
- Q5_1 (24 / 32): d f16, m f16, qh[4], qs[16]
- Q4_K (144 / 256): d f16, dmin f16, scales[12] (8 six-bit scales and 8 six-bit mins), qs[128] (per 64 codes,
  32 bytes: codes 0..31 in the low nibbles, 32..63 in the high ones)
- Q5_K (176 / 256): as Q4_K with qh[32] before qs: bit j of qh[l] is the fifth bit of code 32 j + l
- Q6_K (210 / 256): ql[128], qh[64], scales int8[16], d f16: per 128 codes, ql's 64 bytes hold codes 0..63 low and
  64..127 high, qh's 32 bytes hold bits 4-5 of codes 32 k + l at bits 2 k of byte l
"""

from __future__ import annotations

import numpy as np

from jaxinfer import quant

# GGUF type name -> the quant layout that holds it exactly.
KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "int4_g32_min", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k",
        "Q5_K": "q5_k", "Q6_K": "q6_k"}
_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _blocks(data: np.ndarray, type_name: str) -> np.ndarray:
    """[rows, row bytes] uint8 -> [rows, blocks per row, block bytes]."""
    _, size = _BLOCK[type_name]
    data = np.ascontiguousarray(data).view(np.uint8)
    return data.reshape(data.shape[0], -1, size)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _rows(x: np.ndarray) -> np.ndarray:
    """[rows, blocks, per block] -> [rows, blocks * per block]."""
    return x.reshape(x.shape[0], -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K scales [rows, blocks, 12] -> (6-bit scales, 6-bit mins) [rows, blocks, 8] uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from
    bytes 8-11 (scale low nibble, min high) and their top 2 from the spare bits 6-7 of bytes 0-3 and 4-7."""
    first, second, rest = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([first & 0x3F, (rest & 0x0F) | ((first >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([second & 0x3F, (rest >> 4) | ((second >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_low_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K qs [rows, blocks, 128] -> low 4 bits of the 256 codes [rows, blocks, 256], in order."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32)  # per 64 codes
    return ((chunks >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F).reshape(*qs.shape[:-1], 256)


def q8_0(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q8_0")
    return {"values": _rows(np.ascontiguousarray(b[..., 2:]).view(np.int8)), "scales": _f16(b[..., 0:2])}


def q4_0(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q4_0")
    return {"values": _rows(b[..., 2:]), "scales": _f16(b[..., 0:2])}


def q4_1(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q4_1")
    return {"values": _rows(b[..., 4:]), "scales": _f16(b[..., 0:2]), "mins": _f16(b[..., 2:4])}


def q5_0(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q5_0")
    return {"values": _rows(b[..., 6:]), "high_bits": _rows(b[..., 2:6]), "scales": _f16(b[..., 0:2])}


def q5_1(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q5_1")
    return {"values": _rows(b[..., 8:]), "high_bits": _rows(b[..., 4:8]), "scales": _f16(b[..., 0:2]),
            "mins": _f16(b[..., 2:4])}


def _k_min_parts(b: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    sc, mn = _k_scales(b[..., 4:16])
    return {"values": quant.pack_nibbles(_rows(codes & 0x0F)), "scales": _rows(sc), "mins": _rows(mn),
            "super_scales": _f16(b[..., 0:2]), "super_mins": _f16(b[..., 2:4])}


def q4_k(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q4_K")
    return _k_min_parts(b, _k_low_codes(b[..., 16:144]))


def q5_k(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q5_K")
    qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # [rows, blocks, 8, 32]: bit j
    codes = _k_low_codes(b[..., 48:176]) | ((qh & 1).reshape(*b.shape[:-1], 256) << 4)
    parts = _k_min_parts(b, codes)
    parts["high_bits"] = quant.pack_bits(_rows(codes >> 4), 1)
    return parts


def q6_k(data: np.ndarray) -> dict[str, np.ndarray]:
    b = _blocks(data, "Q6_K")
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)  # [.., 2, 2, 64]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)  # [.., 2, 4, 32]
    codes = ((ql & 0x0F).reshape(*lead, 256) | ((qh & 0x03).reshape(*lead, 256) << 4))
    return {"values": quant.pack_nibbles(_rows(codes & 0x0F)), "high_bits": quant.pack_bits(_rows(codes >> 4), 2),
            "scales": _rows(np.ascontiguousarray(b[..., 192:208]).view(np.int8)), "super_scales": _f16(b[..., 208:210])}


CONVERTERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q4_K": q4_k, "Q5_K": q5_k,
              "Q6_K": q6_k}


def parts(type_name: str, data: np.ndarray) -> dict[str, np.ndarray]:
    """A tensor's bytes [rows, row bytes] of a KEPT type -> the parts of KEPT[type_name], each [rows, n]."""
    return CONVERTERS[type_name](data)
