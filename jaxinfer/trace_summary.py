"""Read a jax.profiler trace back: how much of the devices' time went to collectives."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

# Op and kernel names of collectives as XLA:CPU thunks (psum_invariant, pmax, ...) and XLA:GPU / NCCL name them.
COLLECTIVE_MARKERS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "psum",
                      "pmax", "pmin", "nccl")
_EXECUTE = "ThunkExecutor::Execute"  # one XLA:CPU program run on one device thread


def is_collective(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in COLLECTIVE_MARKERS)


def collective_share(trace_dir: str | Path) -> float:
    """Fraction of device time spent in collectives in the newest trace under trace_dir.

    XLA:CPU: per device thread, collective ops over the time its programs ran (ThunkExecutor::Execute), averaged
    over threads. GPU traces have no such events; there the share is collective kernels over all kernels on the
    device streams (pids other than the host's).
    """
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise ValueError(f"no *.trace.json.gz under {trace_dir}")
    events = [e for e in json.load(gzip.open(files[-1]))["traceEvents"] if e.get("ph") == "X"]
    by_thread = collections.defaultdict(lambda: [0.0, 0.0])  # (pid, tid) -> [program time, collective time]
    for e in events:
        key = (e["pid"], e["tid"])
        if e["name"] == _EXECUTE:
            by_thread[key][0] += e["dur"]
        elif is_collective(e["name"]):
            by_thread[key][1] += e["dur"]
    shares = [c / t for t, c in by_thread.values() if t > 0]
    if shares:
        return sum(shares) / len(shares)
    device = [e for e in events if e["pid"] != min(x["pid"] for x in events)]
    total = sum(e["dur"] for e in device)
    return sum(e["dur"] for e in device if is_collective(e["name"])) / total if total else 0.0
