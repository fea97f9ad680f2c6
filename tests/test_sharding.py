"""Tensor parallelism on 8 fake CPU devices: every degree gives tp=1's logits, tokens and seeded samples."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxinfer
from conftest import TOLERANCE, random_hf_model, random_prompts
from jaxinfer import ModelConfig, SamplingParams, sharding
from jaxinfer.generate import allocate_cache
from jaxinfer import model as model_lib
from jaxinfer.runtime import Runtime
from jaxinfer.steps import RowSettings, decode_step, generate_loop
from jaxinfer.sampling import SamplingArrays, row_keys

ROOT = Path(__file__).resolve().parent.parent
LOGITS_ATOL = TOLERANCE["model"]["float32"]

# Tiny HF configs; together: MHA, GQA split and replicated (kv_heads < tp), MQA, tied and untied embeddings.
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
SHARDED_CONFIGS = {
    # name: (architecture, config, tensor-parallel degrees it divides)
    "mha": ("LlamaForCausalLM", dict(_BASE, num_attention_heads=8, num_key_value_heads=8,
                                     tie_word_embeddings=False), (2, 4, 8)),
    # kv heads split at tp=2, each replicated to tp // 2 devices at 4 and 8; llama3 rope scaling.
    "gqa": ("LlamaForCausalLM", dict(_BASE, num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                     tie_word_embeddings=False,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
            (2, 4, 8)),
    # One kv head on every device, with q/k/v biases and tied embeddings.
    "mqa-tied": ("Qwen2ForCausalLM", dict(_BASE, num_attention_heads=8, num_key_value_heads=1,
                                          tie_word_embeddings=True), (2, 4, 8)),
    # A sliding window shorter than the prompts.
    "mistral": ("MistralForCausalLM", dict(_BASE, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                           tie_word_embeddings=False), (2, 4)),
}
CASES = [(name, tp) for name, (_, _, tps) in SHARDED_CONFIGS.items() for tp in tps]

PROMPT_LENGTHS = [3, 11, 17, 6]
MIXED_SAMPLING = [  # two greedy rows and two sampled ones through every filter
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2),
    SamplingParams(temperature=1.3, min_p=0.05),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> HF checkpoint directory, written once."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, kwargs, _ = SHARDED_CONFIGS[name]
            hf = random_hf_model(arch, kwargs)  # skips the test where torch is missing (CI's jax 0.11 stage)
            path = tmp_path_factory.mktemp(f"hf-{name}")
            hf.save_pretrained(path)
            made[name] = path
        return made[name]

    return get


@pytest.fixture(scope="module")
def reference(checkpoint):
    """name -> (unsharded Model, its score logits, mixed-batch tokens, greedy-batch tokens): the tp=1 results."""
    done = {}

    def get(name: str):
        if name not in done:
            m = jaxinfer.load_model(checkpoint(name))
            assert m.mesh is None
            done[name] = (m, *run_all(m))
        return done[name]

    return get


def run_all(m):
    prompts = random_prompts(m.cfg.vocab_size, PROMPT_LENGTHS, seed=3)
    logits = jaxinfer.score(m, prompts[2] + prompts[3])  # 23 tokens: past the mistral window
    mixed = [o.tokens for o in jaxinfer.generate(m, prompts, 12, MIXED_SAMPLING, seed=7)]
    greedy = [o.tokens for o in jaxinfer.generate(m, prompts, 12, SamplingParams(temperature=0.0))]
    return logits, mixed, greedy


@pytest.mark.parametrize("name,tp", CASES)
def test_sharded_matches_unsharded(name, tp, checkpoint, reference):
    ref, ref_logits, ref_mixed, ref_greedy = reference(name)
    m = jaxinfer.load_model(checkpoint(name), tensor_parallel=tp)
    assert m.cfg == ref.cfg and sharding.tp_size(m.mesh) == tp
    logits, mixed, greedy = run_all(m)
    np.testing.assert_allclose(logits, ref_logits, atol=LOGITS_ATOL, rtol=0)
    assert greedy == ref_greedy
    assert mixed == ref_mixed  # seeded samples (top-k, top-p, min-p, repetition penalty) too
    assert all(len(t) == 12 or t[-1] in ref.cfg.eos_token_ids for t in mixed)


def test_params_and_cache_land_in_the_megatron_layout(checkpoint):
    """gqa at tp=4: heads, F and V split; K=2 < 4 kv heads replicated; the cache stores 4 kv heads, one per device."""
    m = jaxinfer.load_model(checkpoint("gqa"), tensor_parallel=4, layout="scanned")
    cfg, tp = m.cfg, 4
    D, F, N, K, H, V = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    L, layers = cfg.num_layers, m.params.layers  # stacked: every device holds every layer of its shard
    local = {
        "embed": (m.params.embed, (V // tp, D)),
        "lm_head": (m.params.lm_head, (D, V // tp)),
        "wq": (layers.wq, (L, D, N // tp, H)),
        "wk": (layers.wk, (L, D, K, H)),  # replicated: K < tp
        "wo": (layers.wo, (L, N // tp, H, D)),
        "w_gate": (layers.w_gate, (L, D, F // tp)),
        "w_down": (layers.w_down, (L, F // tp, D)),
        "final_norm": (m.params.final_norm, (D,)),
    }
    for name, (array, shape) in local.items():
        assert len(array.addressable_shards) == tp, name
        assert {s.data.shape for s in array.addressable_shards} == {shape}, name
    cache = allocate_cache(cfg, [20], 1, 32, 16, None, m.mesh)
    assert cache.k_pages.shape == (L, tp, 2, 16, H)
    assert {s.data.shape for s in cache.k_pages.addressable_shards} == {(L, 1, 2, 16, H)}


def test_random_model_generates_the_same_weights_in_place():
    cfg = ModelConfig.preset("tiny").replace(num_heads=8, head_dim=8)
    one, four = jaxinfer.random_model(cfg, seed=3), jaxinfer.random_model(cfg, seed=3, tensor_parallel=4)
    unrolled = jaxinfer.random_model(cfg, seed=3, tensor_parallel=4, layout="unrolled")
    assert four.params.layers.w_up.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")  # [L, D, F]
    assert unrolled.params.layers[1].w_up.sharding.spec == jax.sharding.PartitionSpec(None, "tp")  # [D, F]
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_generate_stream_runs_sharded(checkpoint, reference):
    _, _, ref_mixed, _ = reference("gqa")
    m = jaxinfer.load_model(checkpoint("gqa"), tensor_parallel=8)
    prompts = random_prompts(m.cfg.vocab_size, PROMPT_LENGTHS, seed=3)
    streamed = [[] for _ in prompts]
    for chunk in jaxinfer.generate_stream(m, prompts, 12, MIXED_SAMPLING, seed=7, chunk_tokens=5):
        for out, new in zip(streamed, chunk.new_tokens):
            out.extend(new)
    assert streamed == ref_mixed


# ---------------------------------------------------------------------------------------------
# Compiled HLO: the collectives are exactly the Megatron ones


def _collective_lines(text: str, op: str) -> list[str]:
    return [line for line in text.splitlines() if f" {op}(" in line or f" {op}-start(" in line]


@pytest.mark.parametrize("layout", model_lib.LAYOUTS)
@pytest.mark.parametrize("name,tp", [("gqa", 4), ("mha", 8), ("mqa-tied", 2)])
def test_decode_step_hlo_has_two_all_reduces_per_layer(name, tp, layout, checkpoint):
    m = jaxinfer.load_model(checkpoint(name), tensor_parallel=tp, layout=layout)
    cfg, B = m.cfg, 4
    cache = allocate_cache(cfg, [24] * B, B, 32, 16, None, m.mesh)
    seq_ids, tokens, active = np.arange(B, dtype=np.int32), np.zeros((B,), np.int32), np.ones((B,), bool)
    runtime = Runtime(mesh=m.mesh)
    text = decode_step.lower(m.params, cfg, tokens, cache, seq_ids, active, runtime=runtime).compile().as_text()
    counts = sharding.hlo_collectives(text)
    # One after attention and one after the MLP per layer (scanned: the layer body's two, run num_layers times),
    # and the vocab-parallel embedding lookup's one; logits stay split over V, so nothing else.
    assert counts["all-reduce"] == (2 * cfg.num_layers if layout == "unrolled" else 2) + 1
    # Each on one token's activations per row: the embedding's [B, 1, D], the layers' on all tokens flat [1, B, D].
    activations = (f"f32[{B},1,{cfg.d_model}]", f"f32[1,{B},{cfg.d_model}]")
    assert all(any(a in line for a in activations) for line in _collective_lines(text, "all-reduce"))
    assert counts["all-gather"] == counts["reduce-scatter"] == counts["all-to-all"] == counts["collective-permute"] == 0


def test_generate_loop_hlo_samples_without_gathering_weights(checkpoint):
    """The whole loop: decode steps plus sampling. Greedy adds a pmax and a pmin on [B] per sample (the first token
    and each loop step); only the top-k/top-p/min-p branch all-gathers, and only the [B, V] logits."""
    m = jaxinfer.load_model(checkpoint("gqa"), tensor_parallel=4, layout="scanned")
    cfg, B = m.cfg, 4
    cache = allocate_cache(cfg, [24] * B, B, 32, 16, None, m.mesh)
    rows = RowSettings(np.arange(B, dtype=np.int32), SamplingArrays.from_params(MIXED_SAMPLING, B), row_keys(0, B),
                       np.full((B, 1), -1, np.int32), np.full((B,), 16, np.int32))
    first_logits = jax.device_put(np.zeros((B, cfg.vocab_size), np.float32),
                                  jax.sharding.NamedSharding(m.mesh, jax.sharding.PartitionSpec(None, "tp")))
    seen = np.zeros((B, cfg.vocab_size), bool)
    text = generate_loop.lower(m.params, cfg, first_logits, cache, rows, seen, max_new_tokens=16,
                               runtime=Runtime(mesh=m.mesh)).compile().as_text()
    counts = sharding.hlo_collectives(text)
    assert counts["all-reduce"] == (2 + 1) + 2 * 2  # the scanned layer's two and the embedding's, then sampling
    gathers = _collective_lines(text, "all-gather")
    assert len(gathers) == 2 and all(f"f32[{B},{cfg.vocab_size}]" in line for line in gathers), gathers
    assert counts["reduce-scatter"] == counts["all-to-all"] == counts["collective-permute"] == 0


@pytest.mark.parametrize("vocab,tp", [(256, 8), (64, 8), (256, 2)])
def test_vocab_split_logprobs_equal_one_device_and_gather_only_each_shards_top_k(vocab, tp):
    """The engine's logprobs on logits split over V: a pmax and a psum for the normalizer, each shard's top-k
    (all of a 64-token vocabulary's 8 per shard: fewer than K=20) all-gathered, never the [B, V] row. Ties across
    shards keep lax.top_k's order: the lower id first."""
    B, K = 5, 20
    rng = np.random.default_rng(vocab + tp)
    logits = rng.normal(size=(B, vocab)).astype(np.float32)
    logits[1, [3, vocab // 2 + 1, vocab - 1]] = logits[1].max() + 1.0  # a tie for the top, on different shards
    tokens = rng.integers(0, vocab, B).astype(np.int32)
    mesh = sharding.make_mesh(tp)
    split = jax.device_put(logits, sharding.vocab_split(mesh))
    fn = jax.jit(lambda x, t: sharding.logprobs(x, t, K, mesh=mesh))
    token_logprob, top_ids, top_logprobs = map(np.asarray, fn(split, tokens))
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [B, V]
    np.testing.assert_allclose(token_logprob, want[np.arange(B), tokens], atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(top_ids, np.argsort(-want, axis=-1, kind="stable")[:, :K])
    np.testing.assert_allclose(top_logprobs, np.take_along_axis(want, top_ids, axis=-1), atol=LOGITS_ATOL, rtol=0)
    assert top_ids[1, :3].tolist() == [3, vocab // 2 + 1, vocab - 1]
    gathers = _collective_lines(fn.lower(split, tokens).compile().as_text(), "all-gather")
    width = tp * min(K, vocab // tp)
    assert len(gathers) == 2 and all(f"[{B},{width}]" in line for line in gathers), gathers


# ---------------------------------------------------------------------------------------------
# Bad degrees


def test_bad_tensor_parallel_degrees_raise(checkpoint):
    path = checkpoint("gqa")  # 8 heads, 2 kv heads, ffn 128, vocab 256
    for tp, message in [(3, "tensor_parallel=3 must divide num_heads=8"),
                        (16, "tensor_parallel=16 exceeds the 8 available devices"),
                        (0, "tensor_parallel=0 must be a positive int")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            jaxinfer.load_model(path, tensor_parallel=tp)
    base = ModelConfig.preset("tiny")
    for cfg, tp, message in [
        (base.replace(num_heads=12, num_kv_heads=6, ffn_dim=96), 4, "tensor_parallel=4 and num_kv_heads=6"),
        (base.replace(vocab_size=250), 4, "tensor_parallel=4 must divide vocab_size=250"),
        (base.replace(ffn_dim=90), 4, "tensor_parallel=4 must divide ffn_dim=90"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            jaxinfer.random_model(cfg, tensor_parallel=tp)


# ---------------------------------------------------------------------------------------------
# Orbax: save from one mesh, restore straight onto another


def test_sharded_orbax_round_trip_onto_other_mesh_sizes(checkpoint, reference, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from jaxinfer.checkpoints.orbax_ckpt import named_leaves, save_orbax

    ref, _, ref_mixed, _ = reference("gqa")
    four = jaxinfer.load_model(checkpoint("gqa"), tensor_parallel=4)
    save_orbax(four.cfg, four.params, tmp_path / "ckpt")
    for tp in (2, 8):
        restored = jaxinfer.load_model(tmp_path / "ckpt", tensor_parallel=tp)
        assert restored.cfg == ref.cfg
        want, got = named_leaves(ref.params), named_leaves(restored.params)  # both in this platform's layout
        shardings = named_leaves(jax.tree.map(lambda p: jax.sharding.NamedSharding(restored.mesh, p),
                                              sharding.pspecs_like(restored.params, ref.cfg, tp)))
        assert list(got) == list(want)
        for name in want:
            assert got[name].sharding.is_equivalent_to(shardings[name], got[name].ndim), name
            assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), name
    assert run_all(restored)[1] == ref_mixed


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed over gloo CPU collectives), 4 devices each, tp=8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_one_process_tokens(tmp_path, capsys):
    cfg = ModelConfig.preset("tiny").replace(num_heads=8, num_kv_heads=2, head_dim=8)
    preset = tmp_path / "tp8.json"
    preset.write_text(json.dumps(cfg.to_dict()))
    common = ["--preset", str(preset), "--tp", "8", "--batch", "2", "--prompt-len", "12", "--steps", "10",
              "--warmup", "0", "--iters", "1"]

    spec = importlib.util.spec_from_file_location("run_sharded", ROOT / "scripts" / "run_sharded.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(common)
    one_process = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tokens[")]
    assert len(one_process) == 2

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT))
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "run_sharded.py"), *common, "--cpu-collectives", "gloo",
             "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es), 8 cpu device(s), tensor_parallel=8" in outputs[0]
    assert [line for line in outputs[0].splitlines() if line.startswith("tokens[")] == one_process
    assert "decode step HLO: 3 all-reduces (expected 3" in outputs[0]  # the scanned layer body's 2, the embedding's
