"""The public entry points: a loaded Model and load_model; generate and score live in jaxinfer.generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jaxinfer import model
from jaxinfer.config import ModelConfig


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: model.Params
    tokenizer: object | None = None  # anything with encode(str) -> list[int] and decode(list[int]) -> str


def load_model(path: str | Path, dtype: str | None = None) -> Model:
    """A HF directory (config.json + *.safetensors, single or sharded with an index).

    dtype: "float32" | "bfloat16" | "float16"; None keeps the checkpoint's own.
    """
    from jaxinfer.checkpoints.hf import load_hf

    path = Path(path)
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        cfg, params = load_hf(path, dtype)
        return Model(cfg, params, _tokenizer_for(path))
    raise ValueError(f"model path {str(path)!r} is not a HF checkpoint directory")


def random_model(preset: str | ModelConfig, seed: int = 0, dtype: str | None = None) -> Model:
    """Random weights for a preset name (configs/<name>.json) or a ModelConfig: tests and benchmarks."""
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return Model(cfg, model.init_params(cfg, jax.random.key(seed)))


def _tokenizer_for(path: Path):
    """HF tokenizer.json beside the weights, when there is one and the `tokenizers` package is installed."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return _HFTokenizer(Tokenizer.from_file(str(tokenizer_file)))


class _HFTokenizer:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
