"""Runtime: how the device steps run, as opposed to what they compute (ModelConfig) or on which weights (Params).

One frozen, hashable value passed by keyword (`runtime=`) through model, sharding and steps, static under jit: a
new Runtime is a new program, the same Runtime reuses the compiled one.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from jaxinfer.attention import BACKENDS
from jaxinfer.quant import check_quantized_matmul


@dataclasses.dataclass(frozen=True)
class Runtime:
    """attention_backend: one of attention.BACKENDS, or None for the platform's default (attention.DEFAULT_BACKEND).
    mesh: None runs on one device; a jax.sharding.Mesh runs the model and sampling under shard_map over its tp
    axis (jaxinfer.sharding), with the same results.
    quantized_matmul: how a quantized weight meets its activations (jaxinfer.quant.QUANTIZED_MATMULS): "xla"
    (dequantize and dot), "kernel" (jaxinfer.cpu_kernels' native matmul, activations rounded to 16 bits per block of
    32: the default model's KL divergence from "xla" ~1e-6), "kernel-float" (float activations: XLA's results up to
    the order of a sum, slower at batch 1), "kernel-int8" (activations rounded to int8 per block of 32, as llama.cpp
    does: a little faster, KLD ~0.003), or None: "kernel" on the CPU where the kernels built, else "xla".
    (Scanned or unrolled layers is the params' layout, jaxinfer.model.with_layout: static as a pytree structure.)"""

    attention_backend: str | None = None
    mesh: Mesh | None = None
    quantized_matmul: str | None = None

    def __post_init__(self):
        if self.attention_backend is not None and self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r} must be one of {BACKENDS} or None")
        check_quantized_matmul(self.quantized_matmul)
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, not {type(self.mesh).__name__}")


DEFAULT = Runtime()
