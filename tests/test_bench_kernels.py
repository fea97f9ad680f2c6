"""scripts/bench_kernels.py on the CPU: every implementation checked against the reference, peers that need a GPU
reported as skipped, the JSON holding the rows. Interpret mode at tiny shapes: a smoke test, not a speed test."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"
FAST = ["--interpret", "--tiny", "--warmup", "1", "--iters", "2"]


def load_bench():
    if "bench_kernels" not in sys.modules:  # registered first: its dataclasses look their module up while defined
        spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_kernels"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_kernels"]


def test_tiny_interpret_rows_checked_and_timed(capsys, tmp_path):
    bench = load_bench()
    out_json = tmp_path / "kernels.json"
    results = bench.main([*FAST, "--gpu", "h100", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "FAILED" not in out and "!!!" not in out

    blocks = out.split("\n")
    for shape in bench.TINY_SHAPES:
        start = blocks.index(f"{shape.label} bfloat16")
        block = blocks[start + 1:start + 1 + len(bench.IMPLS)]
        unit = "TFLOP/s" if shape.op == "prefill" else "TB/s"
        peak = "% of h100 peak" if shape.op == "prefill" else "% of h100 HBM"
        for name in ("ours: pallas_kernels", "XLA attention_reference (gather)", "XLA dense jnp (contiguous)"):
            (line,) = [b for b in block if b.strip().startswith(name)]
            assert " ms " in line and unit in line and peak in line, line
            if not name.startswith("ours"):
                assert "ours/peer" in line, line
        for name in ("cuDNN dot_product_attention", "JAX attention_mgpu (Mosaic GPU)"):
            (line,) = [b for b in block if b.strip().startswith(name)]
            assert line.split(name)[1].strip().startswith("skipped: "), line

    written = json.loads(out_json.read_text())
    assert written["ok"] and written["jax"] and written["device"] and written["date"] and written["command"]
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["label"], r["impl"]): r for r in written["rows"]}
    assert len(rows) == len(bench.TINY_SHAPES) * len(bench.IMPLS)
    for shape in bench.TINY_SHAPES:
        for impl in ("ours", "xla-reference", "xla-dense"):
            r = rows[shape.label, impl]
            assert r["status"] == "ok" and r["ms"] > 0 and r["max_err"] <= r["tol"] and r["roofline_fraction"] > 0
            assert r["tflops" if shape.op == "prefill" else "tbps"] > 0
        assert rows[shape.label, "cudnn"]["status"] == "skipped" and rows[shape.label, "cudnn"]["reason"]
        assert rows[shape.label, "jax-mgpu"]["status"] == "skipped"
        assert rows[shape.label, "ours-triton"]["status"] == "ok"  # the generic body beside the default pick
        # JAX's Triton kernels run interpreted here: their layout adapters are checked on the CPU too.
        assert rows[shape.label, "jax-triton"]["status"] == "ok"


def test_a_wrong_output_is_marked_mismatch(capsys, monkeypatch):
    bench = load_bench()
    ours = bench.IMPLS[0]
    assert ours.key == "ours"

    def off_by_one(problem, interpret):
        return dataclasses.replace(ours.setup(problem, interpret), post=lambda o: o + 1)

    monkeypatch.setattr(bench, "IMPLS", [dataclasses.replace(ours, setup=off_by_one), *bench.IMPLS[1:]])
    results = bench.main([*FAST, "--only", "decode", "--impls", "ours", "xla-dense"])
    out = capsys.readouterr().out
    assert not results["ok"]
    (mismatch,) = [r for r in results["rows"] if r["status"] == "MISMATCH"]
    assert mismatch["impl"] == "ours" and mismatch["max_err"] > 0.5
    assert "MISMATCH: max |o - ref|" in out and "!!! MISMATCH: ours: pallas_kernels" in out
    # No speedup is claimed against a kernel that computes the wrong thing.
    assert all("ours_over_peer" not in r for r in results["rows"])
