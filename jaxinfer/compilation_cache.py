"""The persistent XLA compilation cache, on by default for the CLI and the Python API alike.

A fresh process spends most of its time to first token compiling; the cache makes a repeated run reuse the
programs (TTFT of a repeated `jaxinfer generate` on the CPU: 6.8 s -> 2.0 s). Where it lives:

    JAXINFER_COMPILATION_CACHE=DIR   use DIR
    JAXINFER_COMPILATION_CACHE=      (empty, or "off") no persistent cache
    unset                            $XDG_CACHE_HOME/jaxinfer/xla, else ~/.cache/jaxinfer/xla

A directory the user gave jax itself (`JAX_COMPILATION_CACHE_DIR`, or `jax.config.update(
"jax_compilation_cache_dir", ...)` before jaxinfer loads) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "JAXINFER_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false")


def compilation_cache_dir() -> Path | None:
    """Where jaxinfer's compiled programs are cached, or None when the cache is off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxinfer" / "xla"


def enable() -> Path | None:
    """Point jax's persistent cache at compilation_cache_dir() unless the user chose one; returns the directory
    in use (None: off). Called when jaxinfer first imports jax, before anything compiles."""
    import jax

    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    path = compilation_cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # jax caches only programs that took >= 1 s to compile by default; on the CPU the many sub-second ones
    # (sampling, the small buckets) add up to most of a fresh process's TTFT.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
