"""load_config: the ModelConfig load_model would give, for every kind of path, without reading a weight."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxinfer
from jaxinfer import model
from jaxinfer.checkpoints import gguf_file, layout, orbax_ckpt
from jaxinfer.checkpoints.safetensors_file import SafetensorsFile
from jaxinfer.config import ModelConfig, RopeScaling

LLAMA3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)  # the constants every Llama 3.x GGUF's rope_freqs encodes


def refuse(*args, **kwargs):
    raise AssertionError("load_config read a weight")


# ---------------------------------------------------------------------------------------------
# GGUF


def write_gguf(path, cfg: ModelConfig):
    """Zero F32 weights of the right shapes, the metadata llama.cpp writes; cfg.rope_scaling (llama3) becomes
    rope_freqs.weight, as llama.cpp's converter stores it."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), cfg.architecture)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    entries, _ = layout.source_leaves(gguf_file.gguf_tensor_map(cfg.replace(rope_scaling=None)))
    for name, shape in ((name, e.shape) for e in entries for name in e.names()):
        w.add_tensor(name, np.zeros(shape, np.float32))
    if cfg.rope_scaling is not None:
        factors = model.rope_inv_freq(cfg.replace(rope_scaling=None)) / model.rope_inv_freq(cfg)  # [H / 2]
        w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_LLAMA3 = ModelConfig.preset("tiny").replace(rope_theta=500000.0, rope_scaling=LLAMA3)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("cfg", [ModelConfig.preset("tiny"), TINY_LLAMA3], ids=["tiny", "llama3-rope-freqs"])
def test_gguf_config_equals_load_gguf(tmp_path, cfg, dtype):
    path = write_gguf(tmp_path / "tiny.gguf", cfg)
    loaded, _ = gguf_file.load_gguf(path, dtype)  # load_model's cfg for a GGUF (the file has no tokenizer)
    assert jaxinfer.load_config(path, dtype) == loaded
    assert loaded.rope_scaling == cfg.rope_scaling


def test_gguf_config_dequantizes_only_rope_freqs(tmp_path, monkeypatch):
    read, dequantize = [], gguf_file._dequantize

    def recording(gguf, tensor, data):
        read.append(tensor.name)
        return dequantize(gguf, tensor, data)

    monkeypatch.setattr(gguf_file, "_dequantize", recording)
    assert jaxinfer.load_config(write_gguf(tmp_path / "llama3.gguf", TINY_LLAMA3)).rope_scaling == LLAMA3
    assert read == ["rope_freqs.weight"]
    monkeypatch.setattr(gguf_file, "_dequantize", refuse)
    assert jaxinfer.load_config(write_gguf(tmp_path / "tiny.gguf", ModelConfig.preset("tiny"))).vocab_size == 256


@pytest.fixture(scope="module")
def default_gguf():
    try:
        return gguf_file.default_gguf_path()
    except ValueError as e:
        pytest.skip(f"the embedded default model is not installed: {e}")


def test_default_model_config_equals_load_model(default_gguf):
    m = jaxinfer.load_model("default")
    assert jaxinfer.load_config("default") == m.cfg
    assert jaxinfer.load_config(default_gguf, "bfloat16") == m.cfg.replace(dtype="bfloat16")


def test_default_model_config_reads_no_weight(default_gguf, monkeypatch):
    gguf = pytest.importorskip("gguf")
    monkeypatch.setattr(gguf_file, "_dequantize", refuse)
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    cfg = jaxinfer.load_config("default")
    assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.tie_embeddings) == (30, 576, 49152, True)


# ---------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_hf_config_equals_load_model(hf_checkpoint, family, dtype):
    path, _ = hf_checkpoint(family)
    assert jaxinfer.load_config(path, dtype) == jaxinfer.load_model(path, dtype).cfg


def test_hf_config_opens_no_weight_file(hf_checkpoint, monkeypatch):
    path, _ = hf_checkpoint("llama3")
    want = jaxinfer.load_model(path).cfg
    monkeypatch.setattr(SafetensorsFile, "__init__", refuse)
    monkeypatch.setattr(SafetensorsFile, "read", refuse)
    assert jaxinfer.load_config(path) == want


def test_hf_config_json_alone_is_enough(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert jaxinfer.load_config(tmp_path) == ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        jaxinfer.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Orbax checkpoints


@pytest.fixture(scope="module")
def orbax_tiny(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    m = jaxinfer.random_model("tiny", dtype="bfloat16")
    return orbax_ckpt.save_orbax(m.cfg, m.params, tmp_path_factory.mktemp("orbax") / "tiny")


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_orbax_config_equals_load_model(orbax_tiny, dtype):
    cfg = jaxinfer.load_config(orbax_tiny, dtype)
    assert cfg == jaxinfer.load_model(orbax_tiny, dtype).cfg
    assert cfg.dtype == (dtype or "bfloat16")


def test_orbax_config_restores_no_tensor(orbax_tiny, monkeypatch):
    want = jaxinfer.load_model(orbax_tiny).cfg
    monkeypatch.setattr(orbax_ckpt, "_ocp", refuse)
    monkeypatch.setattr(orbax_ckpt, "_restore", refuse)
    assert jaxinfer.load_config(orbax_tiny) == want


# ---------------------------------------------------------------------------------------------
# Bad paths: the same errors as load_model


@pytest.mark.parametrize("load", [jaxinfer.load_config, jaxinfer.load_model], ids=["load_config", "load_model"])
def test_bad_paths_raise_as_load_model_does(tmp_path, load):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="is neither a .gguf file nor a checkpoint directory"):
        load(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load(tmp_path / "empty")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load(tmp_path / "x.gguf")
