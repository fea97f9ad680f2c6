"""roofline.py against published parameter counts, KV sizes, datasheet ratios and hand-counted FLOPs."""

import math

import pytest

from jaxinfer import roofline as rl
from jaxinfer.config import ModelConfig

MiB = 2**20


def preset(name):
    return ModelConfig.preset(name)


@pytest.mark.parametrize(
    "name, count",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("llama-3.1-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("qwen2.5-7b", 7_615_616_512),
        ("smollm2-135m", 134_515_008),
    ],
)
def test_param_count_matches_published(name, count):
    assert rl.param_count(preset(name)) == count


def test_weight_bytes_default_from_dtype():
    cfg = preset("llama-2-7b")  # bfloat16
    assert rl.weight_bytes(cfg) == 2 * 6_738_415_616
    assert rl.weight_bytes(cfg, 0.5) == 6_738_415_616 / 2
    tiny = preset("tiny")  # float32
    assert rl.weight_bytes(tiny) == 4 * rl.param_count(tiny)


def test_kv_bytes_llama_2_7b():
    cfg = preset("llama-2-7b")
    assert rl.kv_bytes_per_token(cfg) == 0.5 * MiB
    assert rl.kv_cache_bytes(cfg, 4096) == 2_147_483_648
    assert rl.kv_cache_bytes(cfg, 4096, batch=3) == 3 * 2_147_483_648
    # GQA: Llama-3-8B keeps 8 of 32 heads' KV.
    assert rl.kv_bytes_per_token(preset("llama-3-8b")) == 0.125 * MiB


# tiny: V=256 D=64 L=2 N=4 K=2 H=16 F=128, untied, float32. Counted by hand:
#   per layer: wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 + 3 * 64*128 = 4096 + 2048 + 2048 + 4096 + 24576 = 36864
#   matmul params: 2 * 36864 + lm_head 64*256 = 73728 + 16384 = 90112  -> 180224 FLOPs per token
#   all params: 90112 + embedding 16384 + norms 2 * 2 * 64 + final norm 64 = 106816
#   attention per (query, key) pair: 4 * L * N * H = 4 * 2 * 4 * 16 = 512
def test_tiny_hand_counted():
    tiny = preset("tiny")
    assert rl.param_count(tiny) == 106_816
    assert rl.matmul_flops_per_token(tiny) == 180_224
    assert rl.kv_bytes_per_token(tiny) == 2 * 2 * 2 * 16 * 2
    # Decode after 9 cached tokens: the new query sees 10 keys.
    assert rl.attention_flops(tiny, 1, 9) == 512 * 10
    assert rl.decode_flops(tiny, batch=3, context_len=9) == 3 * (180_224 + 5120)
    # Causal prefill of 8 tokens: 1 + 2 + ... + 8 = 36 (query, key) pairs; the full matrix has 64.
    assert rl.attention_flops(tiny, 8, 0) == 512 * 36
    assert rl.attention_flops(tiny, 8, 0, causal=False) == 512 * 64
    assert rl.prefill_flops(tiny, 8) == 8 * 180_224 + 512 * 36
    assert rl.prefill_flops(tiny, 8, batch=2) == 2 * (8 * 180_224 + 512 * 36)
    # Only the last position's logits: the lm_head (2 * 64 * 256) runs once, not 8 times.
    assert rl.prefill_flops(tiny, 8, all_logits=False) == 8 * 180_224 - 7 * 32_768 + 512 * 36
    # A chunk of 4 after 6 cached tokens: 7 + 8 + 9 + 10 = 34 pairs.
    assert rl.prefill_flops(tiny, 4, context_len=6) == 4 * 180_224 + 512 * 34


def test_tied_embedding_counts_once_but_lm_head_matmul_counts():
    cfg = preset("smollm2-135m")
    untied = cfg.replace(tie_embeddings=False)
    table = cfg.vocab_size * cfg.d_model
    assert rl.param_count(untied) - rl.param_count(cfg) == table
    assert rl.matmul_flops_per_token(untied) == rl.matmul_flops_per_token(cfg)


def _brute_force_keys(query_len, context_len, window, causal):
    end = context_len + query_len
    total = 0
    for p in range(context_len, end):
        last = p if causal else end - 1  # the newest key this query sees
        first = 0 if window is None else max(0, last - window + 1)
        total += last - first + 1
    return total


@pytest.mark.parametrize("window", [None, 1, 3, 7, 16])
@pytest.mark.parametrize("query_len, context_len", [(0, 0), (1, 0), (1, 5), (5, 0), (8, 3), (4, 20), (30, 2)])
def test_attention_flops_window_matches_brute_force(window, query_len, context_len):
    cfg = preset("tiny").replace(sliding_window=window)
    per_pair = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    for causal in (True, False):
        keys = _brute_force_keys(query_len, context_len, window, causal)
        assert rl.attention_flops(cfg, query_len, context_len, causal=causal) == per_pair * keys


def test_sliding_window_caps_decode_attention_and_kv_reads():
    cfg = preset("mistral-7b")  # window 4096
    per_pair = 4 * 32 * 32 * 128
    assert rl.attention_flops(cfg, 1, 100_000) == per_pair * 4096
    assert rl.attention_flops(cfg, 1, 100) == per_pair * 101
    kv = rl.kv_bytes_per_token(cfg)
    assert rl.decode_step_bytes(cfg, 2, 100_000) == rl.weight_bytes(cfg) + 2 * 4096 * kv
    # Storage is not windowed: the paged cache keeps every token.
    assert rl.kv_cache_bytes(cfg, 100_000) == 100_000 * kv


def test_decode_step_bytes():
    cfg = preset("llama-2-7b")
    weights = 2 * 6_738_415_616
    assert rl.decode_step_bytes(cfg, 1, 0) == weights + 0.5 * MiB  # the new token's KV written
    assert rl.decode_step_bytes(cfg, 4, 1023) == weights + 4 * 1024 * 0.5 * MiB
    assert rl.decode_step_bytes(cfg, 1, 0, weight_bytes_per_param=1, kv_bytes_per_elem=1) == weights / 2 + MiB / 4


def test_gpu_table_and_ops_per_byte():
    assert rl.ops_per_byte(rl.gpu("a10")) == pytest.approx(208.3, abs=0.05)
    h100 = rl.gpu("h100")
    assert (h100.peak_flops, h100.hbm_bytes_per_s) == (989e12, 3.35e12)
    assert (rl.gpu("h200").peak_flops, rl.gpu("h200").hbm_bytes_per_s) == (989e12, 4.8e12)
    assert {"a10", "a100-40gb", "a100-80gb", "h100", "h200"} <= set(rl.GPUS)
    assert h100.replace(hbm_bytes_per_s=3.05e12).hbm_bytes_per_s == 3.05e12
    with pytest.raises(ValueError, match=r"unknown gpu 'b200'.*'a10'.*'h100'"):
        rl.gpu("b200")
    with pytest.raises(ValueError, match="hbm_bytes_per_s=0"):
        h100.replace(hbm_bytes_per_s=0)


def test_critical_batch_size_matches_ops_per_byte():
    cfg, a10 = preset("llama-2-7b"), rl.gpu("a10")
    b = rl.critical_batch_size(cfg, a10)
    # At context 0 with bf16 weights, intensity is ~batch (2 FLOPs per 2-byte weight), so the crossing
    # is ~ops:byte; a little above it since the embedding is read but does no FLOPs.
    assert rl.ops_per_byte(a10) < b < 1.05 * rl.ops_per_byte(a10)
    assert rl.decode_arithmetic_intensity(cfg, math.ceil(b), 0) >= rl.ops_per_byte(a10)
    assert rl.decode_arithmetic_intensity(cfg, math.floor(b), 0) < rl.ops_per_byte(a10)
    assert rl.decode_floor_seconds(cfg, a10, math.floor(b), 0) == pytest.approx(
        rl.decode_step_bytes(cfg, math.floor(b), 0) / a10.hbm_bytes_per_s
    )
    # Longer contexts add KV bytes faster than FLOPs: the crossing moves out, then vanishes for MHA
    # (1 FLOP per KV byte in bf16, far below 208).
    assert rl.critical_batch_size(cfg, a10, context_len=64) > b
    assert rl.critical_batch_size(cfg, a10, context_len=4096) == math.inf
    # GQA's 4x smaller KV keeps a crossing at 256 tokens of context on an H100, but not at 1k.
    assert math.isfinite(rl.critical_batch_size(preset("llama-3-8b"), rl.gpu("h100"), context_len=256))
    assert rl.critical_batch_size(preset("llama-3-8b"), rl.gpu("h100"), context_len=1024) == math.inf


def test_decode_floor_llama_2_7b_h100_measured_bandwidth():
    cfg = preset("llama-2-7b")
    h100 = rl.gpu("h100").replace(hbm_bytes_per_s=3.05e12)
    floor = rl.decode_floor_seconds(cfg, h100, batch=1, context_len=0)
    assert floor == pytest.approx(13.48e9 / 3.05e12, rel=1e-3)
    assert 4.4e-3 < floor < 4.43e-3
    # Compute-bound far past the critical batch.
    big = rl.decode_floor_seconds(cfg, h100, batch=4096, context_len=0)
    assert big == pytest.approx(rl.decode_flops(cfg, 4096, 0) / h100.peak_flops)


def test_prefill_floor_is_compute_bound_for_long_prompts():
    cfg, h100 = preset("llama-3-8b"), rl.gpu("h100")
    assert rl.prefill_floor_seconds(cfg, h100, 4096) == pytest.approx(rl.prefill_flops(cfg, 4096) / 989e12)
    assert rl.prefill_floor_seconds(cfg, h100, 1) == pytest.approx(rl.decode_step_bytes(cfg, 1, 0) / 3.35e12)


def test_mbu_mfu():
    h100 = rl.gpu("h100")
    assert rl.mbu(3.35e12, 2.0, h100) == pytest.approx(0.5)
    assert rl.mfu(989e12, 4.0, h100) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="seconds=0"):
        rl.mbu(1e9, 0, h100)
    with pytest.raises(ValueError, match="flops=-1"):
        rl.mfu(-1, 1.0, h100)


def test_kv_capacity_tokens():
    cfg = preset("llama-2-7b")
    weights = 2 * 6_738_415_616
    assert rl.kv_capacity_tokens(cfg, weights + 10 * MiB) == 20
    assert rl.kv_capacity_tokens(cfg, weights + 10 * MiB, reserved_bytes=MiB) == 18
    assert rl.kv_capacity_tokens(cfg, weights + 10 * MiB, kv_bytes_per_elem=1) == 40
    assert rl.kv_capacity_tokens(cfg, 1e9) == 0  # the weights don't fit
    # An 80 GiB H100 holds ~130k tokens of Llama-2-7B KV beside its bf16 weights.
    assert rl.kv_capacity_tokens(cfg, rl.gpu("h100").memory_bytes) == (80 * 2**30 - weights) // (MiB // 2)


def test_format_roofline():
    cfg = preset("llama-2-7b")
    h100 = rl.gpu("h100")
    t = 5e-3
    text = rl.format_roofline(cfg, h100, 1, 0, t)
    gb = rl.decode_step_bytes(cfg, 1, 0) / 1e9
    assert f"{gb / t:.0f} GB/s ({100 * gb * 1e9 / t / 3.35e12:.0f}% of HBM)" in text
    assert "2695 GB/s (80% of HBM)" in text
    assert "MFU" in text and "memory-bound" in text and "h100" in text
    assert "floor 4.02 ms" in text
    assert "compute-bound" in rl.format_roofline(cfg, h100, 4096, 0, 0.1)
    with pytest.raises(ValueError, match="step_seconds=0"):
        rl.format_roofline(cfg, h100, 1, 0, 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda cfg: rl.decode_flops(cfg, -1, 0), "batch=-1"),
        (lambda cfg: rl.decode_flops(cfg, 0, 0), "batch=0"),
        (lambda cfg: rl.decode_step_bytes(cfg, 1, -5), "context_len=-5"),
        (lambda cfg: rl.kv_cache_bytes(cfg, -1), "tokens=-1"),
        (lambda cfg: rl.kv_cache_bytes(cfg, 10, batch=True), "batch=True"),
        (lambda cfg: rl.kv_bytes_per_token(cfg, 0), "bytes_per_elem=0"),
        (lambda cfg: rl.weight_bytes(cfg, -2), "bytes_per_param=-2"),
        (lambda cfg: rl.attention_flops(cfg, 1.5, 0), "query_len=1.5"),
        (lambda cfg: rl.prefill_flops(cfg, 0), "prompt_len=0"),
        (lambda cfg: rl.kv_capacity_tokens(cfg, 80e9, reserved_bytes=-1), "reserved_bytes=-1"),
        (lambda cfg: rl.decode_floor_seconds(cfg, rl.gpu("h100"), -3, 0), "batch=-3"),
    ],
)
def test_bad_inputs_raise_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call(preset("tiny"))
