"""A progress bar on stderr for long loads and conversions: `progress(done, total)` callbacks draw it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ProgressFn = Callable[[int, int], None]


def bar(label: str, stream=None, width: int = 30, min_seconds: float = 0.5) -> ProgressFn:
    """A callback that redraws `label [#####.....] done/total` in place when the bar grows.

    Silent for loads under min_seconds; on a stream that is not a terminal, only the final line is written.
    """
    stream = stream or sys.stderr
    start = time.perf_counter()
    interactive = stream.isatty()
    drawn = [-1]  # the last filled width drawn

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        filled = width * done // max(total, 1)
        finished = done >= total
        if not finished and (elapsed < min_seconds or not interactive or filled == drawn[0]):
            return
        drawn[0] = filled
        end = "\n" if finished else ""
        stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensors {elapsed:.1f}s{end}")
        stream.flush()

    return update


def resolve(progress: bool | ProgressFn | None, label: str) -> ProgressFn | None:
    """progress=True draws a bar, a callable is used as is, None/False draws nothing."""
    if progress is True:
        return bar(label)
    return progress or None
