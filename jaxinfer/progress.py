"""A progress bar on stderr for long loads and conversions: `progress(done, total)` callbacks draw it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ProgressFn = Callable[[int, int], None]


def bar(label: str, stream=None, width: int = 30, min_seconds: float = 0.5) -> ProgressFn:
    """A callback that redraws `label [#####.....] done/total` in place; silent for loads under min_seconds."""
    stream = stream or sys.stderr
    start = time.perf_counter()

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        if elapsed < min_seconds and done < total:
            return
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tensors {elapsed:.1f}s{end}")
        stream.flush()

    return update


def resolve(progress: bool | ProgressFn | None, label: str) -> ProgressFn | None:
    """progress=True draws a bar, a callable is used as is, None/False draws nothing."""
    if progress is True:
        return bar(label)
    return progress or None
