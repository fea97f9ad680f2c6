"""ModelConfig: presets, from_hf for published and transformers-5 config.json files, clear errors."""

from __future__ import annotations

import pytest

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
