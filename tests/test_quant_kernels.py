"""Quantized weights through jaxinfer.cpu_kernels: which contractions the model sends to the native matmul
(Runtime.quantized_matmul / Model.quantized_matmul), and that they compute what XLA's dequantize-and-dot does."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from conftest import random_prompts
from jaxinfer import cpu_kernels, kv_cache, quant
from jaxinfer import model as model_lib
from jaxinfer.runtime import Runtime

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"CPU kernels: {cpu_kernels.unavailable_reason()}")

KERNEL_CALL = "jaxinfer_qmatmul"  # the FFI target names: jaxinfer_qmatmul_<layout>
CFG = jaxinfer.ModelConfig.preset("tiny").replace(d_model=128, num_heads=4, head_dim=32, ffn_dim=256)


def _logits_program(model: jaxinfer.Model, matmul) -> str:
    """The lowered text of the logits of a hidden state through the model's head."""
    hidden = jnp.ones((1, 3, model.cfg.d_model), jnp.float32)
    return jax.jit(lambda p, h: model_lib.logits(p, model.cfg, h, matmul)).lower(model.params, hidden).as_text()


def _forward_program(model: jaxinfer.Model, matmul, tokens: int = 4) -> str:
    cache = kv_cache.init_cache(model.cfg, max_seqs=1, pages_per_seq=8, num_pages=9, page_size=16)
    tokens, positions = jnp.zeros((1, tokens), jnp.int32), jnp.arange(tokens, dtype=jnp.int32)[None]

    def run(params, cache):
        return model_lib.forward(params, model.cfg, tokens, positions, cache, jnp.zeros((1,), jnp.int32),
                                 runtime=Runtime(quantized_matmul=matmul))

    return jax.jit(run).lower(model.params, cache).as_text()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_default_on_the_cpu_is_the_kernel(quantize):
    model = jaxinfer.random_model(CFG, quantize=quantize)
    for matmul in (None, "kernel", "kernel-float", "kernel-int8"):
        text = _forward_program(model, matmul)
        # the scanned layer body: q, k and v in one call, gate and up in one (x quantized once); o and down alone
        layout = quant.MODES[quantize]
        assert text.count(f"{KERNEL_CALL}_many_{layout}") >= 2 and text.count(f"{KERNEL_CALL}_{layout}") >= 2, matmul
        assert KERNEL_CALL in _logits_program(model, matmul)
    assert KERNEL_CALL not in _forward_program(model, "xla")


def test_many_rows_go_to_xla():
    """A prefill chunk of more than quant.KERNEL_MAX_ROWS tokens: XLA's dequantize-and-dot, its weights tied to the
    layer's input (quant.after) so that they are dequantized as the layer runs; at the limit, the kernel."""
    model = jaxinfer.random_model(CFG, quantize="int4")
    for matmul in (None, "kernel", "kernel-float"):
        assert KERNEL_CALL in _forward_program(model, matmul, tokens=quant.KERNEL_MAX_ROWS), matmul
        assert KERNEL_CALL not in _forward_program(model, matmul, tokens=quant.KERNEL_MAX_ROWS + 1), matmul
    # int8 activations round x as llama.cpp does at every size: the same arithmetic whatever the batch
    assert KERNEL_CALL in _forward_program(model, "kernel-int8", tokens=quant.KERNEL_MAX_ROWS + 1)
    w = jax.tree.leaves(model.params, is_leaf=quant.is_quant)
    w = next(leaf for leaf in w if quant.is_quant(leaf) and leaf.lead_ndim == 0)
    x_many = jnp.ones((1, quant.KERNEL_MAX_ROWS + 1, CFG.d_model))
    tied = quant.after({"w": w}, x_many)["w"]
    assert tied.parts["scales"] is not w.parts["scales"]  # tied: the XLA path's dequantization waits for x
    assert quant.after({"w": w}, x_many[:, :4])["w"] is w  # the kernel reads it as stored


def test_a_layout_without_a_kernel_stays_on_xla():
    model = jaxinfer.random_model(CFG, quantize="int8-channel")  # int8_channel: no kernel (yet)
    assert KERNEL_CALL not in _forward_program(model, None)
    assert KERNEL_CALL not in _forward_program(model, "kernel")


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_kernel_logits_equal_xla_logits(quantize, layout):
    """Float activations: the dequantized function, up to the order of each sum."""
    model = jaxinfer.random_model(CFG, quantize=quantize, layout=layout)
    (ids,) = random_prompts(CFG.vocab_size, [20], seed=3)
    kernel = jaxinfer.score(dataclasses.replace(model, quantized_matmul="kernel-float"), ids)
    xla = jaxinfer.score(dataclasses.replace(model, quantized_matmul="xla"), ids)
    np.testing.assert_allclose(kernel, xla, atol=1e-5 * max(1.0, np.abs(xla).max()), rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 20])  # decode's M = 1 integer dots; a prefill's float dots on round16(x)
def test_int16_activations_stay_within_their_rounding(prompt_len):
    """The default kernel rounds each block of 32 activations to 16 bits: 256 times finer than kernel-int8, so its
    logits sit about 256 times closer to XLA's (on the default model: KLD < 1e-6, greedy tokens equal)."""
    model = jaxinfer.random_model(CFG, quantize="int4")
    (ids,) = random_prompts(CFG.vocab_size, [prompt_len], seed=8)
    logits = {m: np.asarray(jaxinfer.score(dataclasses.replace(model, quantized_matmul=m), ids))
              for m in ("kernel", "kernel-int8", "xla")}
    rms = {m: np.sqrt(np.mean((logits[m] - logits["xla"]) ** 2)) for m in ("kernel", "kernel-int8")}
    assert 0 < rms["kernel"] < rms["kernel-int8"] / 30, rms


def test_int8_activations_stay_close():
    """kernel-int8 rounds each block of 32 activations to int8: not the same numbers, close ones (a step of
    max|x| / 127 per block; measured here: RMS |dlogit| ~0.3% of the logits' spread)."""
    model = jaxinfer.random_model(CFG, quantize="int8")
    (ids,) = random_prompts(CFG.vocab_size, [24], seed=4)
    int8 = np.asarray(jaxinfer.score(dataclasses.replace(model, quantized_matmul="kernel-int8"), ids))
    xla = np.asarray(jaxinfer.score(dataclasses.replace(model, quantized_matmul="xla"), ids))
    assert not np.array_equal(int8, xla)
    assert np.sqrt(np.mean((int8 - xla) ** 2)) < 0.02 * np.std(xla)


def test_tensor_parallel_kernel_equals_unsharded():
    model = jaxinfer.random_model(CFG, quantize="int8")
    sharded = jaxinfer.random_model(CFG, quantize="int8", tensor_parallel=2)
    (ids,) = random_prompts(CFG.vocab_size, [12], seed=5)
    want = jaxinfer.score(dataclasses.replace(model, quantized_matmul="xla"), ids)
    got = jaxinfer.score(dataclasses.replace(sharded, quantized_matmul="kernel-float"), ids)
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("matmul", ["kernel", "kernel-float", "kernel-int8"])
def test_engine_tokens_equal_generate_with_the_kernel(matmul):
    model = dataclasses.replace(jaxinfer.random_model(CFG, quantize="int4"), quantized_matmul=matmul)
    prompts = random_prompts(CFG.vocab_size, [5, 17, 9], seed=6)
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    want = [o.tokens for o in jaxinfer.generate(model, prompts, max_new_tokens=8, sampling=greedy)]
    engine = jaxinfer.Engine(model, max_slots=4, max_tokens_per_step=32, page_size=8, warm_up=False)
    assert [o.tokens for o in engine.generate(prompts, sampling=greedy, max_new_tokens=8)] == want


def test_bad_quantized_matmul_is_named():
    with pytest.raises(ValueError, match="quantized_matmul='fast'"):
        Runtime(quantized_matmul="fast")
    model = jaxinfer.random_model(CFG, quantize="int8")
    with pytest.raises(ValueError, match="quantized_matmul='fast'"):
        dataclasses.replace(model, quantized_matmul="fast")


def test_kernels_that_did_not_build(monkeypatch):
    """The default falls back to XLA; asking for the kernel by name is a ValueError with the reason."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "no compiler (g++ not found)")
    model = jaxinfer.random_model(CFG, quantize="int8")
    assert KERNEL_CALL not in _forward_program(model, None)
    with pytest.raises(ValueError, match=r"quantized_matmul='kernel'.*unavailable: no compiler"):
        _forward_program(model, "kernel")


def test_after_leaves_kernel_weights_alone():
    """quant.after ties XLA-path weights to the layer's input; a weight the kernel reads is passed through as it is
    (tying it would copy its scales every step)."""
    kernel_w = jaxinfer.random_model(CFG, quantize="int8", layout="unrolled").params.layers[0].wq  # q8_0
    xla_w = jaxinfer.random_model(CFG, quantize="int8-channel", layout="unrolled").params.layers[0].wq
    x = jnp.ones((1, 2, CFG.d_model), jnp.float32)
    tied_kernel, tied_xla = quant.after((kernel_w, xla_w), x)
    assert tied_kernel.parts["scales"] is kernel_w.parts["scales"]
    assert tied_xla.parts["scales"] is not xla_w.parts["scales"]
    assert quant.after(kernel_w, x, "xla").parts["scales"] is not kernel_w.parts["scales"]


def test_scanned_layers_hand_the_kernel_whole_stacks():
    """Quantized models load scanned, and the scan body passes each weight the kernel reads as its whole stack
    [L, N, n] with the layer index (quant.LayerOf): a sliced operand of a custom call is copied every step."""
    model = jaxinfer.random_model(CFG, quantize="int4")
    assert model_lib.layout_of(model.params) == "scanned"
    assert model_lib.layout_for_platform("cpu", quantized=True) == "scanned"
    assert model_lib.layout_for_platform("gpu", quantized=True) == "scanned"
    calls = [line for line in _forward_program(model, None).splitlines() if f"custom_call @{KERNEL_CALL}" in line]
    stacked_codes = re.compile(rf"tensor<{CFG.num_layers}x\d+x\d+xui8>")  # the values part of an [L, N, n] stack
    assert CFG.num_layers > 1 and sum(bool(stacked_codes.search(line)) for line in calls) == 4, calls
    # q/k/v, o, gate/up and down, each one call in the scan body; the head's table is the fifth call


FLOAT_CALL = "jaxinfer_fmatmul"


def test_float32_weights_go_to_the_float_kernel_up_to_its_rows():
    """float32 weights load scanned too, each projection passed to the float kernel as its whole stack; from
    quant.FLOAT_KERNEL_MAX_ROWS + 1 rows on, under quantized_matmul="xla" and for bfloat16 weights: XLA's dots."""
    model = jaxinfer.random_model(CFG)
    assert model_lib.layout_of(model.params) == "scanned"
    calls = [line for line in _forward_program(model, None, tokens=3).splitlines()
             if f"custom_call @{FLOAT_CALL}" in line]
    stacked = re.compile(rf"tensor<{CFG.num_layers}x\d+x\d+xf32>")
    # q/k/v in one call, o, gate/up in one, down: each with whole stacks; and the head
    assert sum(bool(stacked.search(line)) for line in calls) == 4 and len(calls) == 5, calls
    assert sum(f"@{FLOAT_CALL}_many" in line for line in calls) == 2
    assert FLOAT_CALL not in _forward_program(model, "xla", tokens=3)
    assert FLOAT_CALL not in _forward_program(model, None, tokens=quant.FLOAT_KERNEL_MAX_ROWS + 1)
    bf16 = jaxinfer.random_model(CFG, dtype="bfloat16")
    assert model_lib.layout_of(bf16.params) == "unrolled"
    assert FLOAT_CALL not in _forward_program(bf16, None, tokens=3)


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_float_kernel_computes_xla_s_function(layout):
    """Decode-sized scoring (every matmul through the kernel) equals XLA's dots up to the order of sums; greedy
    tokens are the same."""
    model = jaxinfer.random_model(CFG, layout=layout)
    xla = dataclasses.replace(model, quantized_matmul="xla")
    (ids,) = random_prompts(CFG.vocab_size, [quant.FLOAT_KERNEL_MAX_ROWS], seed=9)
    want = np.asarray(jaxinfer.score(xla, ids))
    np.testing.assert_allclose(jaxinfer.score(model, ids), want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    assert ([o.tokens for o in jaxinfer.generate(model, [ids], max_new_tokens=8, sampling=greedy)]
            == [o.tokens for o in jaxinfer.generate(xla, [ids], max_new_tokens=8, sampling=greedy)])
