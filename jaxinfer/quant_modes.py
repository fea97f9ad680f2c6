"""The values of `quantize=` / `--quantize` and `kv_cache_dtype=` / `--kv-cache-dtype`, plain Python: the CLI checks
its flags before jax is imported."""

from __future__ import annotations

# A mode -> the jaxinfer.quant layout every projection is held in ("auto" and "none" name no layout: "auto" keeps a
# quantized file's own blocks and leaves float weights float, "none" dequantizes everything).
# "int8" is GGUF's Q8_0 (a float16 scale per 32 weights, 8.5 bits a weight): on the default model its KL divergence
# from float32 is a third of one scale per output channel's ("int8-channel", 8 bits, the GPU serving format).
MODES = {"int8": "q8_0", "int8-channel": "int8_channel", "fp8": "fp8_channel", "int4": "int4_g32_min",
         "int4-g32": "int4_g32_min", "int4-g64": "int4_g64_min", "int4-g128": "int4_g128_min"}
QUANTIZE_CHOICES = ("auto", "none", *MODES)
# How a quantized weight meets its activations (Runtime.quantized_matmul, Model.quantized_matmul; None: the
# platform's choice): XLA's dequantize-and-dot, or jaxinfer.cpu_kernels' matmul with its activations rounded to 16 bits
# per block of 32 ("kernel"), kept float ("kernel-float") or rounded to 8 bits as llama.cpp does ("kernel-int8").
QUANTIZED_MATMULS = ("xla", "kernel", "kernel-float", "kernel-int8")
# -> the kernel's activations= (jaxinfer.cpu_kernels.qmatmul.ACTIVATIONS)
KERNEL_ACTIVATIONS = {"kernel": "int16", "kernel-float": "float32", "kernel-int8": "int8"}
KV_CACHE_DTYPES = ("int8", "fp8")  # jaxinfer.kv_cache's quantized caches; kv_cache_dtype=None: the model's dtype
