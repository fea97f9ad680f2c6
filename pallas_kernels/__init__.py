"""Pallas GPU kernels, one file per op (kernel and wrapper) and the jnp reference they share (reference.py).

Nothing here imports jaxinfer: the library sits above its kernels (tests/test_layering.py).
"""
