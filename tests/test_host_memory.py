"""release_free_heap: freed heap memory that glibc would keep resident goes back to the OS."""

import sys

import numpy as np
import pytest

from jaxinfer.host_memory import release_free_heap


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_fragmented_heap_is_returned():
    # 3,000 blocks of 64 KB (below glibc's mmap threshold: they live in the heap), every 50th kept alive so the
    # freed memory sits between live blocks, where free() alone never returns it.
    blocks = [np.ones(64 * 1024 // 8) for _ in range(3000)]
    keep = blocks[::50]
    del blocks
    before = _rss_mb()
    assert release_free_heap()
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert all(k[0] == 1.0 for k in keep)  # what is alive stays readable
