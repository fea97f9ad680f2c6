"""The benchmark and profile scripts run end to end on a tiny preset and print what they promise."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_roofline_terms(capsys, tmp_path):
    bench = load_script("benchmark")
    out_json = tmp_path / "results.json"
    bench.main(["--preset", "tiny", "--batch", "1", "2", "--context", "20", "--prompt-len", "32", "--steps", "4",
                "--gpu", "h100", "--warmup", "1", "--iters", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "prefill batch 1 prompt 32: TTFT" in out and "MFU on h100" in out
    assert "decode batch 2 context 20:" in out and "% of HBM" in out and "floor" in out
    results = json.loads(out_json.read_text())["results"]
    assert [r["kind"] for r in results] == ["prefill", "decode", "decode"]
    assert all(r.get("seconds", r.get("seconds_per_token")) > 0 for r in results)


def test_benchmark_rejects_unknown_gpu():
    with pytest.raises(ValueError, match="unknown gpu 'b200x'"):
        load_script("benchmark").main(["--preset", "tiny", "--gpu", "b200x"])


def test_profile_writes_a_trace(tmp_path):
    load_script("profile_trace").main(["--preset", "tiny", "--prompt-len", "16", "--decode-steps", "2", "--out",
                                 str(tmp_path / "trace")])
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))
