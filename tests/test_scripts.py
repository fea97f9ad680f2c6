"""The benchmark and profile scripts run end to end on a tiny preset and print what they promise."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_roofline_terms(capsys, tmp_path):
    bench = load_script("benchmark")
    out_json = tmp_path / "results.json"
    bench.main(["--preset", "tiny", "--batch", "1", "2", "--context", "20", "--prompt-len", "32", "--steps", "4",
                "--gpu", "h100", "--warmup", "1", "--iters", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "prefill batch 1 prompt 32 (chunks of 256): TTFT" in out and "MFU on h100" in out
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


def test_run_sharded_reports_the_collective_share(capsys, tmp_path):
    import re

    run_sharded = load_script("run_sharded")
    run_sharded.main(["--preset", "tiny", "--tp", "2", "--steps", "4", "--iters", "1", "--profile",
                      str(tmp_path / "tp2")])
    share = float(re.search(r"communication: ([\d.]+)% of device time", capsys.readouterr().out).group(1))
    assert 0 < share <= 100
    run_sharded.main(["--preset", "tiny", "--tp", "1", "--steps", "4", "--iters", "1", "--profile",
                      str(tmp_path / "tp1")])
    assert "communication: 0.0% of device time" in capsys.readouterr().out  # one device: no collectives


def test_collective_names():
    from jaxinfer.trace_summary import is_collective

    assert all(map(is_collective, ["psum_invariant", "all-reduce.3", "ncclDevKernel_AllReduce_Sum_bf16", "pmax"]))
    assert not any(map(is_collective, ["dot.12", "copy_bitcast_fusion", "ThunkExecutor::Execute"]))


def test_gpu_check_plan_fits_eight_minutes():
    import re
    import subprocess

    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=60, check=True)
    names = re.findall(r"^  (\S+) +<= +\d+s", result.stdout, re.M)
    assert names == ["gpu-tests", "bench-kernels", "benchmark-llama-2-7b", "run-sharded-tp1", "layouts-smollm2-135m",
                     "quantized-llama-2-7b"]
    assert "--layout $layout" in result.stdout and "for layout in scanned unrolled" in result.stdout
    assert "for q in int8 int4 fp8" in result.stdout and "--quantize $q --batch 1 32" in result.stdout
    assert "--compare-unsharded" in result.stdout and "--batch 1 32 --context 512 --prompt-len 2048" in result.stdout
    assert int(re.search(r"at most (\d+)s in all", result.stdout).group(1)) <= 8 * 60


def test_gpu_check_writes_its_summaries(tmp_path):
    import subprocess

    # `true` stands in for python: every step "passes" at once, and the summaries are what is checked.
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "true"}
    subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--out", str(tmp_path)], env=env, capture_output=True,
                   timeout=60, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["gpu-tests", "bench-kernels", "benchmark-llama-2-7b",
                                                     "run-sharded-tp1", "layouts-smollm2-135m", "quantized-llama-2-7b"]
    assert all(s["exit"] == 0 and (tmp_path / s["log"]).is_file() for s in summary["steps"])
    assert "| benchmark-llama-2-7b | 0 |" in (tmp_path / "summary.md").read_text()


def test_bench_serving_reports_engine_static_and_prefix_caching(capsys, tmp_path):
    bench = load_script("bench_serving")
    schedule, out_json = tmp_path / "schedule.json", tmp_path / "out.json"
    common = ["--preset", "tiny", "--max-slots", "4", "--max-tokens-per-step", "64"]
    bench.main([*common, "--workload", "shared-prefix", "--groups", "2", "--prompts-per-group", "3",
                "--prefix-len", "48", "--input-len", "8", "--output-len", "4", "--rate", "200",
                "--save-schedule", str(schedule), "--json", str(out_json)])
    out = capsys.readouterr().out
    for needle in ("engine prefix on", "engine prefix off", "static batching", "x static batching's output tok/s",
                   "prefix caching: mean TTFT", "TTFT", "TPOT", "ITL", "E2E", "goodput"):
        assert needle in out, needle
    result = json.loads(out_json.read_text())
    runs = result["runs"]
    assert runs["engine prefix on"]["engine"]["prefix_cache_hit_tokens"] > 0
    assert runs["engine prefix off"]["engine"]["prefix_cache_hit_tokens"] == 0
    assert all(r["output_tokens"] == 6 * 4 for r in runs.values())
    assert runs["engine prefix on"]["engine"]["compilations_after_warm_up"] == 0
    assert runs["static batching"]["compilations_in_timed_pass"] == 0  # the short compile pass covered it
    # The saved schedule replays: the same requests, arrivals and all.
    saved = json.loads(schedule.read_text())["requests"]
    assert len(saved) == 6 and saved[0]["arrival"] > 0
    bench.main([*common, "--load-schedule", str(schedule), "--no-static", "--prefix-caching", "on"])
    assert "6 requests" in capsys.readouterr().out
    # Closed loop: a row per level, every request its full output.
    bench.main([*common, "--load-schedule", str(schedule), "--no-static", "--prefix-caching", "on", "--concurrency",
                "1,3", "--json", str(out_json)])
    assert "engine prefix on c=1 " in capsys.readouterr().out
    runs = json.loads(out_json.read_text())["runs"]
    assert list(runs) == ["engine prefix on c=1", "engine prefix on c=3"]
    assert all(r["output_tokens"] == 6 * 4 and r["requests"] == 6 for r in runs.values())


def test_bench_serving_victim_keeps_decoding_beside_a_long_prefill(capsys):
    bench = load_script("bench_serving")
    bench.main(["--preset", "tiny", "--workload", "victim", "--victim-len", "120", "--attacker-len", "300",
                "--max-slots", "2", "--max-tokens-per-step", "32"])
    out = capsys.readouterr().out
    assert "victim alone" in out and "% of alone" in out


@pytest.fixture(scope="module")
def tiny_server():
    """-> the base url of `jaxinfer serve`'s app on a loopback port, a tiny random model (no tokenizer) behind it."""
    import jax

    import jaxinfer

    for name in ("fastapi", "uvicorn", "httpx", "prometheus_client"):  # a CI stage installs only the package
        pytest.importorskip(name)
    from conftest import live_server
    from jaxinfer.server.app import create_app

    cfg = jaxinfer.ModelConfig.preset("tiny")
    engine = jaxinfer.AsyncEngine(jaxinfer.Model(cfg, jaxinfer.model.init_params(cfg, jax.random.key(0), scale=0.1)),
                                  max_slots=4, max_tokens_per_step=64, page_size=8)
    try:
        with live_server(create_app(engine, "tiny")) as url:
            yield url
    finally:
        engine.close()


def test_bench_serving_over_http_closed_and_open_loop(tiny_server, capsys, tmp_path):
    bench = load_script("bench_serving")
    out_json = tmp_path / "http.json"
    common = ["--url", tiny_server, "--preset", "tiny", "--workload", "fixed", "--num-requests", "6",
              "--input-len", "8", "--output-len", "5", "--request-timeout", "60"]
    bench.main([*common, "--concurrency", "1,4", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert f"{tiny_server}: model tiny (context 512)" in out and "concurrency 1,4" in out
    assert "http c=1 " in out and "http c=4 " in out and out.count("6 of 6 completed, 0 failed") == 2
    result = json.loads(out_json.read_text())
    runs = result["runs"]
    assert list(runs) == ["http c=1", "http c=4"] and result["server"]["model"] == "tiny"
    for run in runs.values():
        assert (run["completed"], run["failed"], run["output_tokens"]) == (6, 0, 6 * 5)
        assert run["ttft_s"]["mean"] > 0 and run["e2e_s"]["mean"] >= run["ttft_s"]["mean"]
    # Open loop: Poisson arrivals, the schedule saved and replayed.
    schedule = tmp_path / "schedule.json"
    bench.main([*common, "--rate", "50", "--save-schedule", str(schedule), "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "http rate 50 " in out and "TTFT" in out and "goodput" in out and "6 of 6 completed, 0 failed" in out
    run = json.loads(out_json.read_text())["runs"]["http rate 50"]
    assert (run["completed"], run["output_tokens"]) == (6, 30)
    bench.main(["--url", tiny_server, "--preset", "tiny", "--load-schedule", str(schedule)])
    assert "6 requests" in capsys.readouterr().out


def test_bench_serving_counts_failed_requests_and_goes_on(tiny_server, capsys, tmp_path):
    bench = load_script("bench_serving")
    out_json = tmp_path / "failed.json"
    # The default preset's vocabulary is far above the tiny model's 256: every prompt is a 400 naming it.
    bench.main(["--url", tiny_server, "--workload", "fixed", "--num-requests", "3", "--input-len", "8",
                "--output-len", "4", "--concurrency", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "http c=2               no request completed" in out and "0 of 3 completed, 3 failed; 1 x HTTP 400" in out
    run = json.loads(out_json.read_text())["runs"]["http c=2"]
    assert (run["completed"], run["failed"]) == (0, 3)


def test_bench_serving_exits_2_naming_an_unreachable_url(capsys):
    pytest.importorskip("httpx")
    import socket

    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as e:
        load_script("bench_serving").main(["--url", url, "--preset", "tiny", "--num-requests", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err, err
