"""Probe (not a test): jaxinfer.cpu_kernels' float32 matmul against XLA's dot, on the default model's shapes held as
the model holds them (projections W [K, N], the tied head [N, K]), interleaved, the load average beside each row.

Three programs per shape and M, each L matmuls chained (each x waits for the previous matmul), L as many as make
~128 MB of weights (at most 64):
  kernel   lax.scan over a stack [L, ...], the kernel reading layer i where it lies (layer=)
  xla      the same scan, XLA's dot on the layer's slice (XLA:CPU copies the slice first)
  xla-unr  unrolled: XLA's dot on L separate arrays (no slicing)
GB/s counts the weight bytes read per matmul.

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/cpu_fmatmul.py [--m 1,2,4,8] [--reps 7]
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels.fmatmul import fmatmul

# (K, N, contract_first): q/o, k/v, gate/up, down, the tied head (the embedding [V, D])
SHAPES = [(576, 576, True), (576, 192, True), (576, 1536, True), (1536, 576, True), (576, 49152, False)]
STREAM_BYTES = 128 << 20


def spec(contract_first):
    return "mk,kn->mn" if contract_first else "mk,nk->mn"


def scanned(matmul):
    def run(x, stack):
        def body(x, i):
            y = matmul(x, stack, i)
            return x + 0.0 * y[:, :1], y[:, :4]

        return jax.lax.scan(body, x, jnp.arange(stack.shape[0]))[1]

    return jax.jit(run)


def unrolled(contract_first):
    def run(x, ws):
        ys = []
        for w in ws:
            y = jnp.einsum(spec(contract_first), x, w)
            x = x + 0.0 * y[:, :1]
            ys.append(y[:, :4])
        return jnp.stack(ys)

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", default="1,2,4,8")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", default=None, help="K:N:first,... (first 1 or 0; default: the default model's)")
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else [
        (int(k), int(n), f == "1") for k, n, f in (s.split(":") for s in args.shapes.split(","))]
    assert build.available(), build.unavailable_reason()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{'K':>5s} {'N':>6s} {'first':>5s} {'M':>3s} | {'kernel us':>9s} {'GB/s':>5s} | {'xla us':>8s} {'GB/s':>5s} | "
          f"{'xla-unr us':>10s} {'GB/s':>5s} | load")
    rng = np.random.default_rng(0)
    for k, n, first in shapes:
        layers = int(min(64, max(2, STREAM_BYTES // (4 * k * n))))
        shape = (layers, k, n) if first else (layers, n, k)
        stack = jnp.asarray(rng.normal(0, 0.02, shape).astype(np.float32))
        ws = [stack[i] for i in range(layers)]
        fns = {
            "kernel": (scanned(lambda x, s, i: fmatmul(x, s, contract_first=first, layer=i)), stack),
            "xla": (scanned(lambda x, s, i: jnp.einsum(spec(first), x, s[i])), stack),
            "xla-unr": (unrolled(first), ws),
        }
        for m in map(int, args.m.split(",")):
            x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
            for f, w in fns.values():
                f(x, w).block_until_ready()
            times = {name: [] for name in fns}
            for _ in range(args.reps):
                for name, (f, w) in fns.items():
                    t = time.perf_counter()
                    f(x, w).block_until_ready()
                    times[name].append((time.perf_counter() - t) / layers)
            us = {name: 1e6 * statistics.median(v) for name, v in times.items()}
            gbs = {name: 4 * k * n / (t * 1e3) for name, t in us.items()}
            print(f"{k:5d} {n:6d} {first!s:>5s} {m:3d} | {us['kernel']:9.1f} {gbs['kernel']:5.1f} | {us['xla']:8.1f} "
                  f"{gbs['xla']:5.1f} | {us['xla-unr']:10.1f} {gbs['xla-unr']:5.1f} | {os.getloadavg()[0]:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
