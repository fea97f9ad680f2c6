"""The values of `quantize=` / `--quantize`, plain Python: the CLI checks its flags before jax is imported."""

from __future__ import annotations

# A mode -> the jaxinfer.quant layout every projection is held in ("auto" and "none" name no layout: "auto" keeps a
# quantized file's own blocks and leaves float weights float, "none" dequantizes everything).
MODES = {"int8": "int8_channel", "fp8": "fp8_channel", "int4": "int4_g32_min", "int4-g32": "int4_g32_min",
         "int4-g64": "int4_g64_min", "int4-g128": "int4_g128_min"}
QUANTIZE_CHOICES = ("auto", "none", *MODES)
