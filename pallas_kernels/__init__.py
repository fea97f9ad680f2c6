"""Pallas GPU kernels, one file per op: kernel, wrapper, reference (arrive with issue 4)."""
