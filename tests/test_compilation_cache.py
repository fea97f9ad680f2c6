"""The persistent compilation cache: on for the Python API, where the environment says, never the user's in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TEST_COMPILATION_CACHE

import jaxinfer
from jaxinfer import compilation_cache


def test_this_test_session_compiles_into_its_own_cache_not_the_users():
    import jax

    jaxinfer.random_model("tiny")  # the API is loaded: the cache is on
    cache = Path(jax.config.jax_compilation_cache_dir)
    assert cache == Path(TEST_COMPILATION_CACHE)
    assert Path.home() / ".cache" not in cache.parents


def test_the_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.compilation_cache_dir() == tmp_path / "jaxinfer" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache.compilation_cache_dir() == Path.home() / ".cache" / "jaxinfer" / "xla"
    monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compilation_cache.compilation_cache_dir() == tmp_path / "mine"
    for off in ("", "off", "0", "None"):
        monkeypatch.setenv(compilation_cache.ENV_VAR, off)
        assert compilation_cache.compilation_cache_dir() is None


def test_python_api_uses_the_cache_and_respects_the_users_choice(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in (compilation_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}

    def cache_dir(**extra) -> str:
        code = "import jax, jaxinfer; jaxinfer.random_model('tiny'); print(jax.config.jax_compilation_cache_dir)"
        result = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True,
                                timeout=120, check=True)
        return result.stdout.strip()

    assert cache_dir(XDG_CACHE_HOME=str(tmp_path)) == str(tmp_path / "jaxinfer" / "xla")
    assert cache_dir(JAXINFER_COMPILATION_CACHE=str(tmp_path / "here")) == str(tmp_path / "here")
    assert cache_dir(JAXINFER_COMPILATION_CACHE="off") == "None"
    assert cache_dir(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax")) == str(tmp_path / "jax")  # jax's own wins
