"""HF safetensors directories: sharded with an index, pickles refused, bad files named, nothing half-loaded."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 has no torch
from safetensors.torch import load_file, save_file  # noqa: E402

import jaxinfer
from conftest import random_prompts


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_with_index_loads_the_same(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama3")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    (ids,) = random_prompts(256, [12])
    np.testing.assert_array_equal(
        jaxinfer.score(jaxinfer.load_model(tmp_path / "sharded"), ids), jaxinfer.score(jaxinfer.load_model(path), ids)
    )


def test_bfloat16_safetensors_load(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen2")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the fixture's model stays float32
    model = jaxinfer.load_model(tmp_path / "bf16")
    assert model.cfg.dtype == "bfloat16" and model.params.embed.dtype == jaxinfer.model.jnp.bfloat16


def test_pickled_weights_are_refused(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama3")
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(path / "config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*refused.*safetensors"):
        jaxinfer.load_model(d)


def test_missing_extra_and_misshaped_tensors_are_all_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama3")
    d = copy_checkpoint(path, tmp_path / "bad")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    tensors["model.layers.7.surprise"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError) as err:
        jaxinfer.load_model(d)
    msg = str(err.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape (3, 64), expected (16, 64)" in msg
    assert "unexpected tensor model.layers.7.surprise" in msg


def test_truncated_file_is_named(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama3")
    d = copy_checkpoint(path, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        jaxinfer.load_model(d)


def test_index_naming_a_missing_shard(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama3")
    d = copy_checkpoint(path, tmp_path / "index")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors"):
        jaxinfer.load_model(d)


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        jaxinfer.load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        jaxinfer.load_model(tmp_path)
