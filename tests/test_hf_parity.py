"""Parity with HF transformers (PyTorch, CPU, float32) on tiny random-weight checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 has no torch

import jaxinfer
from conftest import HF_CONFIGS, TOLERANCE, random_prompts

FAMILIES = sorted(HF_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_hf(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    cfg = jaxinfer.load_model(path).cfg
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.tie_embeddings == (family == "qwen2")
    assert cfg.sliding_window == (8 if family == "mistral" else None)
    assert (cfg.rope_scaling is not None) == (family == "llama3")


# (prefill_chunk, attention backend): one chunk, and chunks that do not divide the 40-token prompt, on the default
# (blocked XLA) attention and the gather-everything reference.
SCORE_RUNS = [(512, "xla"), (7, "xla"), (16, "xla"), (16, "reference")]


@pytest.mark.parametrize("prefill_chunk, backend", SCORE_RUNS, ids=[f"chunk{c}-{b}" for c, b in SCORE_RUNS])
@pytest.mark.parametrize("family", FAMILIES)
def test_score_logits_match_transformers(family, hf_checkpoint, prefill_chunk, backend):
    path, hf = hf_checkpoint(family)
    model = jaxinfer.load_model(path)
    (ids,) = random_prompts(model.cfg.vocab_size, [40], seed=1)  # longer than the mistral window
    ours = jaxinfer.score(model, ids, prefill_chunk=prefill_chunk, attention_backend=backend)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float().numpy()
    assert ours.shape == theirs.shape == (40, model.cfg.vocab_size)
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE["hf"]["float32"], rtol=0)


@pytest.mark.parametrize("prefill_chunk", [512, 5])  # 5: the 11- and 17-token prompts end mid-chunk
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, hf_checkpoint, prefill_chunk):
    path, hf = hf_checkpoint(family)
    model = jaxinfer.load_model(path)
    prompts = random_prompts(model.cfg.vocab_size, [3, 11, 17, 6], seed=2)
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    outs = jaxinfer.generate(model, prompts, max_new_tokens=32, sampling=greedy, prefill_chunk=prefill_chunk)
    eos = hf.config.eos_token_id
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            seq = hf.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=eos
            )[0, len(prompt):].tolist()
        assert out.tokens == seq
        assert out.finish_reason == ("stop" if seq[-1] == eos and len(seq) <= 32 and eos in seq else "length")
