"""CPU kernels in C++ called through jax.ffi (the "kernels" room: imports jax and its own modules only).

Each op: a C++ handler (`<op>.cc`), its Python wrapper and a plain-jnp reference (`<op>.py`):
`from jaxinfer.cpu_kernels.qmatmul import qmatmul`. build.py compiles the sources on first use; `available()` says
whether they built (JAXINFER_CPU_KERNELS=auto|on|off).
"""

from jaxinfer.cpu_kernels.build import KernelsUnavailable, available, unavailable_reason

__all__ = ["KernelsUnavailable", "available", "unavailable_reason"]
