"""Handing freed heap memory back to the operating system (glibc's malloc_trim), plain Python.

XLA:CPU's programs allocate their temporaries with malloc on several threads; glibc keeps what they free inside its
arenas, resident, for reuse. Measured on the default model's engine (int8 KV, 16 slots, 15 step programs warmed up):
1.11 GB resident after warm-up, 0.76 GB after one malloc_trim(0). A server calls this when it goes idle; nothing
else depends on it, and where there is no glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the OS -> whether anything could be asked (glibc only)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
