"""ModelConfig: presets, from_hf for published and transformers-5 config.json files, clear errors."""

from __future__ import annotations

import json
import re

import pytest

import jaxinfer
from jaxinfer.config import ModelConfig, RopeScaling

# As Meta published Llama-3.1-8B's config.json (rope_theta + rope_scaling with rope_type).
LLAMA_31_PUBLISHED = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_published_llama31_equals_preset():
    assert ModelConfig.from_hf(LLAMA_31_PUBLISHED) == ModelConfig.preset("llama-3.1-8b")


def test_transformers5_rope_parameters_equal_published_fields():
    t5 = {k: v for k, v in LLAMA_31_PUBLISHED.items() if k not in ("rope_theta", "rope_scaling")}
    t5["rope_parameters"] = dict(LLAMA_31_PUBLISHED["rope_scaling"], rope_theta=500000.0)
    assert ModelConfig.from_hf(t5) == ModelConfig.from_hf(LLAMA_31_PUBLISHED)


def test_older_rope_scaling_type_key_and_linear_kind():
    hf = dict(LLAMA_31_PUBLISHED, rope_scaling={"type": "linear", "factor": 4.0})
    assert ModelConfig.from_hf(hf).rope_scaling == RopeScaling("linear", 4.0)


def test_dtype_override_and_head_dim_default():
    cfg = ModelConfig.from_hf(LLAMA_31_PUBLISHED, dtype="float32")
    assert cfg.dtype == "float32" and cfg.head_dim == 128


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture \\['GPT2LMHeadModel'\\]"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"num_key_value_heads": 5}, "num_key_value_heads|num_kv_heads=5"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(dict(LLAMA_31_PUBLISHED, **change))


def test_qwen2_per_layer_sliding_window_is_refused():
    hf = dict(LLAMA_31_PUBLISHED, architectures=["Qwen2ForCausalLM"], use_sliding_window=True, rope_scaling=None)
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf(hf)


def test_every_preset_loads_and_round_trips():
    for name in ("llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-135m", "tiny"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        hash(cfg)  # static under jit
    with pytest.raises(ValueError, match="preset 'llama-9'"):
        ModelConfig.preset("llama-9")


@pytest.mark.parametrize(
    "change, message",
    [({"num_heads": 0}, "num_heads=0"), ({"head_dim": 15}, "head_dim=15"), ({"dtype": "int8"}, "dtype='int8'"),
     ({"sliding_window": 0}, "sliding_window=0")],
)
def test_bad_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny").replace(**change)


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


LLAMA3_ROPE = LLAMA_31_PUBLISHED["rope_scaling"]


@pytest.mark.parametrize(
    "hf, message",
    [
        (without(LLAMA_31_PUBLISHED, "num_attention_heads"), "config.json field 'num_attention_heads' is missing"),
        (without(LLAMA_31_PUBLISHED, "vocab_size"), "config.json field 'vocab_size' is missing"),
        (dict(LLAMA_31_PUBLISHED, hidden_size="576"), "config.json field 'hidden_size'='576' must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, hidden_size=None), "field 'hidden_size'=None must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, num_hidden_layers=True), "field 'num_hidden_layers'=True must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, intermediate_size=[14336]), "field 'intermediate_size'=\\[14336\\] must be"),
        (dict(LLAMA_31_PUBLISHED, num_key_value_heads=8.0), "field 'num_key_value_heads'=8.0 must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, head_dim=0), "field 'head_dim'=0 must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, max_position_embeddings="131072"), "field 'max_position_embeddings'='131072'"),
        (dict(LLAMA_31_PUBLISHED, rope_theta="abc"), "field 'rope_theta'='abc' must be a number"),
        (dict(LLAMA_31_PUBLISHED, rms_norm_eps=False), "field 'rms_norm_eps'=False must be a number"),
        (dict(LLAMA_31_PUBLISHED, tie_word_embeddings="false"), "field 'tie_word_embeddings'='false' must be a bool"),
        (dict(LLAMA_31_PUBLISHED, eos_token_id=True), "field 'eos_token_id'=True must be an int or a list of ints"),
        (dict(LLAMA_31_PUBLISHED, eos_token_id=[1, "2"]), "field 'eos_token_id'=\\[1, '2'\\]"),
        (dict(LLAMA_31_PUBLISHED, bos_token_id="<s>"), "field 'bos_token_id'='<s>' must be an int"),
        (dict(LLAMA_31_PUBLISHED, rope_scaling=without(LLAMA3_ROPE, "low_freq_factor")),
         "field 'rope_scaling.low_freq_factor' is missing"),
        (dict(LLAMA_31_PUBLISHED, rope_scaling=dict(LLAMA3_ROPE, factor="8")),
         "field 'rope_scaling.factor'='8' must be a number"),
        (dict(LLAMA_31_PUBLISHED, rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=8192.5)),
         "field 'rope_scaling.original_max_position_embeddings'=8192.5 must be a positive int"),
        (dict(LLAMA_31_PUBLISHED, rope_scaling="llama3"), "field 'rope_scaling'='llama3' must be an object"),
        (dict(without(LLAMA_31_PUBLISHED, "rope_theta"), rope_parameters={"rope_theta": "1e4"}),
         "field 'rope_parameters.rope_theta'='1e4' must be a number"),
        (dict(LLAMA_31_PUBLISHED, architectures="LlamaForCausalLM"), "field 'architectures'='LlamaForCausalLM'"),
    ],
    ids=[
        "missing", "missing-vocab", "str-for-int", "null-for-int", "bool-for-int", "list-for-int", "float-for-int",
        "zero-size", "str-max-positions", "str-rope-theta", "bool-for-number", "str-for-bool", "bool-for-eos",
        "str-in-eos-list", "str-bos", "missing-rope-field", "str-rope-factor", "float-rope-int", "str-rope-scaling",
        "transformers5-rope-theta", "str-architectures",
    ],
)
def test_missing_and_mistyped_hf_fields_are_named(hf, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_null_optional_hf_fields_take_their_defaults():
    nulls = dict(LLAMA_31_PUBLISHED, num_key_value_heads=None, head_dim=None, bos_token_id=None, eos_token_id=None)
    cfg = ModelConfig.from_hf(nulls)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.bos_token_id, cfg.eos_token_ids) == (32, 128, None, ())
    assert ModelConfig.from_hf(dict(LLAMA_31_PUBLISHED, eos_token_id=128001)).eos_token_ids == (128001,)


def test_hf_config_that_is_not_an_object():
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        ModelConfig.from_hf([LLAMA_31_PUBLISHED])


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"vocab_size": 128256,', "not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        (json.dumps(dict(LLAMA_31_PUBLISHED, hidden_size="4096")), "field 'hidden_size'='4096' must be a positive int"),
        (json.dumps(without(LLAMA_31_PUBLISHED, "intermediate_size")), "field 'intermediate_size' is missing"),
    ],
    ids=["bad-json", "not-an-object", "mistyped", "missing"],
)
def test_hf_loader_puts_the_config_file_in_front(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    for load in (jaxinfer.load_config, jaxinfer.load_model):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: ") + message):
            load(tmp_path)
