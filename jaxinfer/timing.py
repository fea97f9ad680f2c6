"""Timing for benchmarks: medians of many runs after warm-up, waiting for the device each sample."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], warmup: int, iters: int, min_sample_seconds: float = 0.0) -> float:
    """Median seconds per fn() call over `iters` samples, after `warmup` calls (compilation included there).

    min_sample_seconds > 0 dispatches enough calls back to back in each sample to last about that long (at most
    100), so kernels of a few microseconds are not measured as host dispatch and timer overhead.
    """
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn())
    calls = 1
    if min_sample_seconds > 0:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        calls = max(1, min(100, math.ceil(min_sample_seconds / max(time.perf_counter() - t0, 1e-9))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls - 1):
            fn()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)
