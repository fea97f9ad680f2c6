"""jaxinfer: a JAX/XLA functional inference stack for Llama-family LLMs.

The public names load on first use (PEP 562), so `import jaxinfer` and `jaxinfer --version`, or a CLI argument
error, answer without importing jax (about a second); `jaxinfer.generate` and friends import it when first touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib import metadata

try:
    __version__ = metadata.version("jaxinfer")
except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "AsyncEngine": "jaxinfer.engine.async_engine",
    "Checkpoint": "jaxinfer.api",
    "Engine": "jaxinfer.engine.engine",
    "GenerationOutput": "jaxinfer.generate",
    "Model": "jaxinfer.api",
    "ModelConfig": "jaxinfer.config",
    "PageAllocator": "jaxinfer.page_allocator",
    "QUANTIZE_CHOICES": "jaxinfer.quant_modes",
    "QUANTIZED_MATMULS": "jaxinfer.quant_modes",
    "QuantArray": "jaxinfer.quant",
    "PagePoolExhausted": "jaxinfer.page_allocator",
    "RequestOutput": "jaxinfer.engine.engine",
    "ParameterError": "jaxinfer.errors",
    "RopeScaling": "jaxinfer.config",
    "Runtime": "jaxinfer.runtime",
    "SamplingParams": "jaxinfer.sampling_params",
    "StreamChunk": "jaxinfer.generate",
    "TokenLogprobs": "jaxinfer.engine.request",
    "compilation_cache_dir": "jaxinfer.compilation_cache",
    "generate": "jaxinfer.generate",
    "generate_stream": "jaxinfer.generate",
    "load_config": "jaxinfer.api",
    "load_model": "jaxinfer.api",
    "open_checkpoint": "jaxinfer.api",
    "random_model": "jaxinfer.api",
    "score": "jaxinfer.generate",
}

__all__ = ["__version__", *sorted(_EXPORTS)]  # noqa: PLE0604 (the lazy names, listed once above)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule jaxinfer.generate binds it as an attribute of the package, which would hide the
    function `jaxinfer.generate`; the public name wins (the module stays reachable through sys.modules)."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
