"""jaxinfer.cpu_kernels.paged_attention against pallas_kernels.reference: decode and chunk shapes, GQA, sliding
windows, pages out of order, the null page, ragged lengths, padding rows, NaN in every slot nothing may read, float32 /
bfloat16 / int8 / fp8 pools, the stacked pool under jit and lax.scan, every instruction set, 1 and 2 threads; then
the model: attention_backend="cpu" against "xla" (score, generate, the engine, tensor parallel)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE

import jaxinfer
from jaxinfer import attention as attention_lib
from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels import paged_attention as pa

ATOL = TOLERANCE["paged_attention"]["float32"]
GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if build.mode() == "off":
        pytest.skip("JAXINFER_CPU_KERNELS=off")
    assert build.available(), f"the CPU kernels did not build: {build.unavailable_reason()}"


@dataclasses.dataclass
class Case:
    q: jax.Array  # [B, T, N, H]
    k_pages: jax.Array  # [(L,) K, P, page_size, H]
    v_pages: jax.Array
    page_table: jax.Array  # [B, pages_per_seq]
    q_positions: jax.Array  # [B, T]
    kv_lengths: jax.Array  # [B]
    k_scales: jax.Array | None = None
    v_scales: jax.Array | None = None

    @property
    def args(self):
        return self.q, self.k_pages, self.v_pages, self.page_table, self.q_positions, self.kv_lengths

    @property
    def scales(self):
        return {"k_scales": self.k_scales, "v_scales": self.v_scales}


def make_case(lengths, *, tokens=1, heads=4, kv_heads=2, head_dim=64, page_size=8, layers=None, storage="float32",
              padding_rows=0, seed=0) -> Case:
    """Rows of kv_lengths `lengths`, each with `tokens` queries at its last positions (the last padding_rows of each
    row set to -1; a row of length 0 all padding). Pages are a random permutation of 1..P-1 (page 0 is the null
    page, and the table's unused entries point at it); page 0 and every slot past a row's length hold NaN (float
    pools) or a NaN scale (int8), so a kernel that reads one of them fails."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    pages_per_seq = max(1, -(-max(lengths) // page_size)) + 1
    num_pages = batch * pages_per_seq + 1
    lead = () if layers is None else (layers,)
    shape = (*lead, kv_heads, num_pages, page_size, head_dim)
    k = rng.normal(size=shape).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    k[..., 0, :, :] = np.nan
    v[..., 0, :, :] = np.nan
    table = np.zeros((batch, pages_per_seq), np.int32)
    order = rng.permutation(np.arange(1, num_pages))
    positions = np.full((batch, tokens), -1, np.int32)
    for b, length in enumerate(lengths):
        used = -(-length // page_size)
        table[b, :used] = order[b * pages_per_seq: b * pages_per_seq + used]
        for slot in range(length, used * page_size):  # written slots of the last page end at the length
            k[..., table[b, slot // page_size], slot % page_size, :] = np.nan
            v[..., table[b, slot // page_size], slot % page_size, :] = np.nan
        live = max(0, min(tokens - padding_rows, length))
        positions[b, :live] = np.arange(length - live, length)
    q = rng.normal(size=(batch, tokens, heads, head_dim)).astype(np.float32)
    case = Case(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table), jnp.asarray(positions),
                jnp.asarray(np.array(lengths, np.int32)))
    return quantized(case, storage, rng)


def quantized(case: Case, storage: str, rng) -> Case:
    """The case's pool stored as `storage`: float32 / bfloat16 as is, int8 codes with a scale per vector (NaN where
    the float pool had NaN: a scale nothing may read), fp8 codes with a per-layer (or per-tensor) scale."""
    if storage == "float32":
        return case
    if storage == "bfloat16":
        return dataclasses.replace(case, k_pages=case.k_pages.astype(jnp.bfloat16),
                                   v_pages=case.v_pages.astype(jnp.bfloat16))
    pages = {}
    for name in ("k", "v"):
        x = np.asarray(getattr(case, f"{name}_pages"))
        poisoned = np.isnan(x).any(axis=-1)
        if storage == "int8":
            codes = rng.integers(-127, 128, x.shape, dtype=np.int8)
            scales = rng.uniform(0.005, 0.02, x.shape[:-1]).astype(np.float32)
            scales[poisoned] = np.nan
        else:  # fp8: codes from values where written (a NaN code is only where nothing may read)
            codes = jnp.asarray(np.where(np.isnan(x), 0.0, x) * 50).astype(jnp.float8_e4m3fn)
            scales = np.full(x.shape[:1] if x.ndim == 5 else (), 0.02, np.float32)
        pages[f"{name}_pages"] = jnp.asarray(codes)
        pages[f"{name}_scales"] = jnp.asarray(scales)
    return dataclasses.replace(case, **pages)


def reference(case: Case, sliding_window=None, layer=None):
    return pa.paged_attention_reference(*case.args, sliding_window=sliding_window, layer=layer, **case.scales)


def assert_close(o, want, atol=ATOL):
    o, want = np.asarray(o, np.float32), np.asarray(want, np.float32)
    assert o.shape == want.shape and np.isfinite(o).all()
    np.testing.assert_allclose(o, want, atol=atol, rtol=atol)


# (lengths, tokens, padding_rows): decode and chunks; lengths 0, 1, page-aligned (8, 16) and not; rows of one batch
# at different lengths; a chunk whose last rows are padding; long rows split across units (> 512 keys).
SHAPES = [
    ([1], 1, 0),
    ([0, 1, 8, 13], 1, 0),
    ([16, 7, 0], 1, 0),
    ([700, 9], 1, 0),
    ([5000], 1, 0),
    ([24, 16, 3], 5, 0),
    ([40, 0, 9], 7, 2),
    ([100], 100, 0),
    ([1200, 50], 33, 4),
]


@pytest.mark.parametrize("lengths,tokens,padding_rows", SHAPES)
@pytest.mark.parametrize("window", [None, 5, 64])
def test_matches_reference(lengths, tokens, padding_rows, window):
    case = make_case(lengths, tokens=tokens, padding_rows=padding_rows)
    o = pa.paged_attention(*case.args, sliding_window=window)
    assert_close(o, reference(case, window))
    padding = np.asarray(case.q_positions) < 0
    assert (np.asarray(o)[padding] == 0).all()


@pytest.mark.parametrize("heads,kv_heads,head_dim,page_size", [
    (9, 3, 64, 16),  # the default model's attention
    (8, 8, 32, 4),  # no grouping, a small head
    (12, 1, 80, 16),  # one kv head (MQA), a head_dim that is not a multiple of 32
    (6, 2, 24, 5),  # a head_dim under one vector, a page size that is no power of two
    (32, 4, 128, 32),
])
@pytest.mark.parametrize("tokens", [1, 19])
def test_head_shapes(heads, kv_heads, head_dim, page_size, tokens):
    case = make_case([37, 64, 3], tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     page_size=page_size)
    assert_close(pa.paged_attention(*case.args), reference(case))


@pytest.mark.parametrize("storage", ["bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("tokens", [1, 6])
def test_quantized_and_16_bit_pools(storage, tokens):
    case = make_case([30, 1, 17], tokens=tokens, storage=storage)
    o = pa.paged_attention(*case.args, **case.scales)
    assert_close(o, reference(case))


@pytest.mark.parametrize("storage", ["float32", "int8", "fp8"])
def test_stacked_pool_with_a_layer_index_under_jit_and_scan(storage):
    layers = 3
    case = make_case([21, 6], tokens=3, layers=layers, storage=storage)
    call = jax.jit(lambda layer: pa.paged_attention(*case.args, layer=layer, **case.scales))
    for layer in range(layers):
        assert_close(call(jnp.int32(layer)), reference(case, layer=layer))

    def body(total, layer):
        o = pa.paged_attention(*case.args, layer=layer, **case.scales)
        return total + o, o

    total, per_layer = jax.jit(lambda: jax.lax.scan(body, jnp.zeros_like(case.q), jnp.arange(layers)))()
    want = [reference(case, layer=layer) for layer in range(layers)]
    for layer in range(layers):
        assert_close(per_layer[layer], want[layer])
    assert_close(total, sum(want), atol=3 * ATOL)


def test_vmap_over_queries():
    case = make_case([21, 6], tokens=3, layers=2)
    qs = jnp.stack([case.q, 2 * case.q])  # [2, B, T, N, H]
    o = jax.vmap(lambda q: pa.paged_attention(q, *case.args[1:], layer=jnp.int32(1)))(qs)
    for i in range(2):
        assert_close(o[i], reference(dataclasses.replace(case, q=qs[i]), layer=1))


def test_a_layer_slice_is_never_copied():
    """The stacked pool goes to the kernel whole: the compiled program slices no layer out of it."""
    case = make_case([21], tokens=1, layers=4)
    hlo = jax.jit(lambda layer: pa.paged_attention(*case.args, layer=layer)).lower(jnp.int32(1)).compile().as_text()
    assert "dynamic-slice" not in hlo and "gather" not in hlo


@pytest.mark.parametrize("isa", pa.ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 24])
def test_every_instruction_set_and_thread_count(isa, threads, tokens):
    if isa not in pa.supported_isas():
        pytest.skip(f"this CPU runs {pa.supported_isas()}")
    case = make_case([600, 33, 0, 8], tokens=tokens, heads=6, kv_heads=2, storage="float32", padding_rows=1)
    assert_close(pa.paged_attention(*case.args, sliding_window=40, isa=isa, threads=threads),
                 reference(case, sliding_window=40))
    int8 = make_case([600, 33, 0, 8], tokens=tokens, heads=6, kv_heads=2, storage="int8")
    assert_close(pa.paged_attention(*int8.args, isa=isa, threads=threads, **int8.scales), reference(int8))


def test_isa_environment_variable_is_a_ceiling(monkeypatch):
    case = make_case([50], tokens=2)
    monkeypatch.setenv(pa.ISA_ENV, "scalar")
    assert pa._isa_code(None) == 1
    assert_close(pa.paged_attention(*case.args), reference(case))
    monkeypatch.setenv(pa.ISA_ENV, "avx512")
    assert pa._isa_code(None) == len(pa.supported_isas())


@pytest.mark.parametrize("change,message", [
    (lambda c: {"q": c.q[0]}, "q must be"),
    (lambda c: {"v_pages": c.v_pages[:, :3]}, "one shape"),
    (lambda c: {"q": jnp.zeros((2, 1, 3, 64), jnp.float32)}, "multiple of K"),
    (lambda c: {"kv_lengths": c.kv_lengths[:1]}, "kv_lengths"),
    (lambda c: {"k_pages": c.k_pages.astype(jnp.int8), "v_pages": c.v_pages.astype(jnp.int8)}, "int8 pages"),
])
def test_refuses_bad_inputs_by_name(change, message):
    case = dataclasses.replace(make_case([9, 3]), **change(make_case([9, 3])))
    with pytest.raises(ValueError, match=message):
        pa.paged_attention(*case.args, **case.scales)


def test_refuses_a_layer_index_without_a_stacked_pool():
    case = make_case([9])
    with pytest.raises(ValueError, match="layer must be given exactly"):
        pa.paged_attention(*case.args, layer=0)


# --------------------------------------------------------------------------------------------
# The attention entry point and the model


def test_cpu_is_the_default_backend_on_the_cpu_where_the_kernels_built():
    assert attention_lib.default_backend() == "cpu"
    assert attention_lib.resolve_backend(None) == "cpu"
    assert "cpu" in attention_lib.QUANTIZED_CACHE_BACKENDS


def test_asking_for_cpu_without_the_kernels_names_the_reason(monkeypatch):
    monkeypatch.setattr(attention_lib.cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(attention_lib.cpu_kernels, "unavailable_reason", lambda: "no C++ compiler 'g++'")
    assert attention_lib.default_backend() == "xla"
    with pytest.raises(ValueError, match="unavailable: no C\\+\\+ compiler 'g\\+\\+'"):
        attention_lib.resolve_backend("cpu")


@pytest.fixture(scope="module")
def tiny():
    return jaxinfer.random_model(jaxinfer.ModelConfig.preset("tiny"))


def test_score_equals_xla(tiny):
    ids = np.random.default_rng(0).integers(0, tiny.cfg.vocab_size, 70).tolist()
    want = np.asarray(jaxinfer.score(tiny, ids, attention_backend="xla", page_size=8, prefill_chunk=32))
    got = np.asarray(jaxinfer.score(tiny, ids, attention_backend="cpu", page_size=8, prefill_chunk=32))
    np.testing.assert_allclose(got, want, atol=TOLERANCE["model"]["float32"], rtol=TOLERANCE["model"]["float32"])


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_generate_equals_xla(kv_cache_dtype):
    model = jaxinfer.random_model(jaxinfer.ModelConfig.preset("tiny"), kv_cache_dtype=kv_cache_dtype)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (5, 30, 17)]
    want = jaxinfer.generate(model, prompts, max_new_tokens=12, sampling=GREEDY, attention_backend="xla",
                             page_size=8)
    got = jaxinfer.generate(model, prompts, max_new_tokens=12, sampling=GREEDY, attention_backend="cpu",
                            page_size=8)
    assert [g.tokens for g in got] == [w.tokens for w in want]


def test_engine_with_the_kernel_equals_generate(tiny):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, tiny.cfg.vocab_size, n).tolist() for n in (3, 41, 12, 26)]
    want = [jaxinfer.generate(tiny, [p], max_new_tokens=10, sampling=GREEDY, attention_backend="xla")[0].tokens
            for p in prompts]
    engine = jaxinfer.Engine(tiny, max_slots=3, max_tokens_per_step=32, page_size=8, prefill_chunk=16,
                             attention_backend="cpu", poison_new_pages=True)
    got = engine.generate(prompts, sampling=GREEDY, max_new_tokens=10)
    assert [g.tokens for g in got] == want


def test_tensor_parallel_equals_one_device():
    cfg = jaxinfer.ModelConfig.preset("tiny")
    one = jaxinfer.random_model(cfg)
    two = jaxinfer.random_model(cfg, tensor_parallel=2)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 40).tolist()
    want = np.asarray(jaxinfer.score(one, ids, attention_backend="xla", page_size=8))
    got = np.asarray(jaxinfer.score(two, ids, attention_backend="cpu", page_size=8))
    np.testing.assert_allclose(got, want, atol=TOLERANCE["model"]["float32"], rtol=TOLERANCE["model"]["float32"])
    prompts = [ids[:9], ids[:23]]
    assert ([g.tokens for g in jaxinfer.generate(two, prompts, max_new_tokens=8, attention_backend="cpu")]
            == [g.tokens for g in jaxinfer.generate(one, prompts, max_new_tokens=8, attention_backend="xla")])
