"""Read tensors out of .safetensors files as numpy arrays (bfloat16 included, via ml_dtypes), memory-mapped.

The safetensors package validates each file; its numpy reader has no bfloat16, so the bytes are mapped
here from the header's offsets.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}


class SafetensorsFile:
    """Tensor names, shapes and dtypes from the header; arrays on demand (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="numpy"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from e
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.tensors = header  # name -> {"dtype", "shape", "data_offsets"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return np.memmap(
            self.path, dtype=_DTYPES[info["dtype"]], mode="r", offset=self._data_start + start,
            shape=tuple(info["shape"]),
        ) if end > start else np.zeros(info["shape"], _DTYPES[info["dtype"]])
