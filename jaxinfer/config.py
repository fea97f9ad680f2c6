"""ModelConfig: one frozen, hashable description of a Llama-family decoder (static under jit)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxinfer.errors import is_int

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# HF `architectures` / `model_type` values this decoder implements exactly.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` divides every frequency; `llama3` only the low ones."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling kind={self.kind!r} is not supported (supported: 'linear', 'llama3')")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # V
    d_model: int  # D
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    ffn_dim: int  # F
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # a query sees itself and the window - 1 keys before it
    max_position_embeddings: int = 4096
    dtype: str = "float32"  # weights and activations; norms, softmax and logits run in float32
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {_DTYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    # Derived sizes: properties, never stored.
    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Presets are data: configs/<name>.json holds these fields.
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def preset(cls, name_or_path: str) -> ModelConfig:
        """A preset by name (`llama-2-7b`) from configs/, or any ModelConfig JSON file by path."""
        path = Path(name_or_path)
        if not path.is_file():
            path = CONFIGS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
            raise ValueError(f"preset {name_or_path!r} not found; presets: {names}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        """From a HF `config.json` dict, as published checkpoints or transformers 5 write it.

        A missing or mistyped field raises HFConfigError naming it as config.json does (`hidden_size`)."""
        if not isinstance(hf, dict):
            raise HFConfigError(f"must hold a JSON object, got {type(hf).__name__}")
        architecture = _hf_architecture(hf)
        if _hf_field(hf, "attention_bias", "bool", False) or _hf_field(hf, "mlp_bias", "bool", False):
            raise ValueError(f"{architecture}: attention_bias / mlp_bias checkpoints are not supported")
        hidden_act = _hf_field(hf, "hidden_act", "str", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported (only 'silu')")
        d_model = _hf_field(hf, "hidden_size", "positive int")
        num_heads = _hf_field(hf, "num_attention_heads", "positive int")
        rope_theta, rope_scaling = _hf_rope(hf)
        eos = _hf_field(hf, "eos_token_id", "int or ints", ())
        return cls(
            vocab_size=_hf_field(hf, "vocab_size", "positive int"),
            d_model=d_model,
            num_layers=_hf_field(hf, "num_hidden_layers", "positive int"),
            num_heads=num_heads,
            num_kv_heads=_hf_field(hf, "num_key_value_heads", "positive int", num_heads),
            head_dim=_hf_field(hf, "head_dim", "positive int", d_model // num_heads),
            ffn_dim=_hf_field(hf, "intermediate_size", "positive int"),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=float(_hf_field(hf, "rms_norm_eps", "number", 1e-6)),
            tie_embeddings=_hf_field(hf, "tie_word_embeddings", "bool", False),
            qkv_bias=architecture == "qwen2",
            sliding_window=_hf_sliding_window(hf, architecture),
            max_position_embeddings=_hf_field(hf, "max_position_embeddings", "positive int", 4096),
            dtype=dtype or _hf_dtype(hf),
            architecture=architecture,
            bos_token_id=_hf_field(hf, "bos_token_id", "int", None),
            eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos),
        )


class HFConfigError(ValueError):
    """A config.json that is not an object, or a field of it missing or of the wrong type.

    str() is `config.json <detail>`; a loader that knows the file says `<path>: <detail>` instead.
    """

    def __init__(self, detail: str):
        self.detail = detail  # "field 'hidden_size'='576' must be a positive int"
        super().__init__(f"config.json {detail}")


# The kinds of value _hf_field checks: kind -> (test, what the error says the value must be).
_HF_KINDS = {
    "int": (is_int, "an int"),
    "positive int": (lambda v: is_int(v) and v > 0, "a positive int"),
    "int or ints": (lambda v: is_int(v) or (isinstance(v, list) and all(map(is_int, v))), "an int or a list of ints"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a bool"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
_REQUIRED = object()


def _hf_field(hf: dict[str, Any], key: str, kind: str, default: Any = _REQUIRED, *, prefix: str = "") -> Any:
    """hf[key], checked to be of `kind` (a key of _HF_KINDS); absent or null: default if it has one.

    prefix: where hf sits in config.json ("rope_scaling."), for the error's field name."""
    value = hf.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if key not in hf:
        raise HFConfigError(f"field {prefix + key!r} is missing")
    test, what = _HF_KINDS[kind]
    if not test(value):
        raise HFConfigError(f"field {prefix + key!r}={value!r} must be {what}")
    return value


def _hf_architecture(hf: dict[str, Any]) -> str:
    names = _hf_field(hf, "architectures", "strs", [])
    model_type = _hf_field(hf, "model_type", "str", None)
    for name in names:
        if name in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[name]
    if not names and model_type in _HF_ARCHITECTURES.values():
        return model_type
    got = names or model_type
    raise ValueError(f"unsupported architecture {got!r}; supported: {sorted(_HF_ARCHITECTURES)}")


def _hf_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 folds theta and scaling into `rope_parameters`; published checkpoints use
    # `rope_theta` + `rope_scaling` (whose kind is `rope_type`, or `type` in older files).
    params = _hf_field(hf, "rope_parameters", "object", {})
    theta = _hf_field(params, "rope_theta", "number", None, prefix="rope_parameters.")
    if theta is None:
        theta = _hf_field(hf, "rope_theta", "number", 10000.0)
    scaling, prefix = _hf_field(hf, "rope_scaling", "object", {}), "rope_scaling."
    if not scaling:
        scaling, prefix = params, "rope_parameters."

    def get(key: str, kind: str = "number"):
        return _hf_field(scaling, key, kind, prefix=prefix)

    kind = _hf_field(scaling, "rope_type" if "rope_type" in scaling else "type", "str", "default", prefix=prefix)
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(get("factor")))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(get("factor")),
            float(get("low_freq_factor")),
            float(get("high_freq_factor")),
            get("original_max_position_embeddings", "positive int"),
        )
    raise ValueError(f"rope scaling rope_type={kind!r} is not supported (supported: 'linear', 'llama3')")


def _hf_sliding_window(hf: dict[str, Any], architecture: str) -> int | None:
    if architecture == "mistral":
        return _hf_field(hf, "sliding_window", "positive int", None)
    if architecture == "qwen2":
        # Qwen2 windows only the layers from max_window_layers on, and only with use_sliding_window.
        layer_types = _hf_field(hf, "layer_types", "strs", [])
        if _hf_field(hf, "use_sliding_window", "bool", False) or "sliding_attention" in layer_types:
            raise ValueError("qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    return None


def _hf_dtype(hf: dict[str, Any]) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in _DTYPES else "float32"

