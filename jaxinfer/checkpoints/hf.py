"""HF checkpoint directories: config.json + *.safetensors (one file, or sharded with an index).

Every tensor is checked (present, expected shape, nothing unexpected) before any is converted, so a
bad checkpoint raises one error naming the file and every offending tensor and never half-loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxinfer import model, quant
from jaxinfer.checkpoints import layout
from jaxinfer.checkpoints.safetensors_file import SafetensorsFile
from jaxinfer.config import HFConfigError, ModelConfig

_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only pickled weights {pickles}: pickles can run code when loaded and are refused; "
                "convert them to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))"
            )
        raise ValueError(f"{path} has no *.safetensors files")
    return files


def read_hf_config(path: str | Path, dtype: str | None = None) -> ModelConfig:
    """The directory's config.json alone -> ModelConfig (no weight file is opened); every error names the file."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a HF checkpoint directory: no config.json")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    try:
        cfg = ModelConfig.from_hf(hf)
    except HFConfigError as e:
        raise ValueError(f"{config_file}: {e.detail}") from e
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    return cfg if dtype is None else cfg.replace(dtype=dtype)  # a bad dtype is the caller's, not the file's


def load_hf(
    path: str | Path, dtype: str | None = None, progress=None, *, mesh=None, quantize: str = "none"
) -> tuple[ModelConfig, model.Params]:
    """progress(done, total) is called after each tensor is converted, if given.

    mesh: put each tensor, as it is converted, straight onto its shards (jaxinfer.sharding); None: one device.
    quantize: "none" / "auto" keep the float weights; a mode of jaxinfer.quant ("int8", "int4", "fp8", ...)
    quantizes each projection as it is read, one tensor at a time.
    """
    quant.check_quantize(quantize)
    path = Path(path)
    cfg = read_hf_config(path, dtype)

    files = [SafetensorsFile(f) for f in _safetensors_files(path)]
    where = {name: f for f in files for name in f.tensors}
    entries, treedef = layout.source_leaves(layout.tensor_map(cfg, HF_NAMES))
    stored = [(name, e.shape) for e in entries for name in e.names()]
    expected = {name for name, _ in stored}
    problems = []
    for name, shape in stored:
        if name not in where:
            problems.append(f"missing tensor {name}")
        elif where[name].shape(name) != shape:
            file = where[name].path.name
            problems.append(f"{file}: tensor {name} has shape {where[name].shape(name)}, expected {shape}")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name in sorted(set(where) - expected - tolerated):
        if not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"{where[name].path.name}: unexpected tensor {name}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems))

    def read(name: str) -> np.ndarray:
        return np.asarray(where[name].read(name))

    layout.check_plan(entries, layout.Reader(read), quantize, cfg, mesh)

    arrays = []
    for entry in entries:
        arrays.append(layout.load_weight(entry, layout.Reader(read), quantize, cfg, mesh))
        if progress:
            progress(len(arrays), len(entries))
    return cfg, jax.tree.unflatten(treedef, arrays)
