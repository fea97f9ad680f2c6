"""Probe (not a test): jaxinfer.cpu_kernels' quantized matmul against XLA's dequantize-and-dot (quant.einsum, as the
model runs it today) and an f32 einsum('mk,nk->mn'), on the default model's shapes, interleaved, with the load average
beside each row (the machine is shared: compare rows measured at the same load).

Each timing is a jitted lax.scan over L different weights of the shape (as many as make >= 64 MB of quantized
weights, so they stream from memory as a decode step's do, and nothing is hoisted out of the loop); the figure is
per matmul. GB/s counts each variant's own weight bytes; the kernel's share is of the bandwidth measured here
(an XLA sum over 512 MB).

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/cpu_qmatmul.py [--layouts q4_0,...] [--m 1,8] [--quick]
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import quant
from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels.qmatmul import LAYOUTS, qmatmul, qmatmul_reference

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N): q/o, k/v, gate/up, down, head
STREAM_BYTES = 64 << 20


def random_parts(layout, n, k, layers, rng):
    parts = {}
    for name, dtype, per in LAYOUTS[layout]:
        shape = (layers, n, k // per)
        if name == "values":
            info = np.iinfo(dtype)
            parts[name] = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        else:
            parts[name] = rng.normal(0, 0.01, shape).astype(np.float16)
    return {name: jnp.asarray(p) for name, p in parts.items()}


def scanned(matmul):
    """f(x [M, K], weights [L, ...]) -> [L, M, N]: one matmul per layer's weight."""
    return jax.jit(lambda x, w: jax.lax.scan(lambda c, wl: (c, matmul(x, wl)), 0, w)[1])


def measured_bandwidth():
    a = jnp.ones((128 << 20,), jnp.float32)  # 512 MB
    f = jax.jit(jnp.sum)
    f(a).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return a.nbytes / min(ts) / 1e9


def time_interleaved(fns, args, reps):
    for name, f in fns.items():
        f(*args[name]).block_until_ready()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f(*args[name]).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--m", default="1,8,64,512")
    parser.add_argument("--shapes", default=None, help="K:N,... (default: the default model's)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--activations", default="int8")
    args = parser.parse_args()
    assert build.available(), build.unavailable_reason()
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    peak = measured_bandwidth()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, isa {build.library().best_isa} (1 scalar 2 avx2 3 avx512), "
          f"measured read bandwidth {peak:.1f} GB/s, load {os.getloadavg()[0]:.2f}")
    print(f"{'layout':13s} {'K':>5s} {'N':>6s} {'M':>4s} | {'kernel ms':>9s} {'GB/s':>5s} {'%bw':>4s} {'GF/s':>5s} | "
          f"{'xla-q ms':>8s} {'GF/s':>5s} | {'f32 ms':>7s} {'GB/s':>5s} {'GF/s':>5s} | {'vs xla-q':>8s} {'vs f32':>6s} "
          f"| load")
    rng = np.random.default_rng(0)
    for k, n in shapes:
        for layout in args.layouts.split(","):
            bytes_q = sum(n * k // per * np.dtype(dtype).itemsize for _, dtype, per in LAYOUTS[layout])
            layers = int(min(1024, max(2, -(-STREAM_BYTES // bytes_q))))
            parts = random_parts(layout, n, k, layers, rng)
            w32 = jnp.asarray(rng.normal(0, 0.01, (layers, n, k)).astype(np.float32))
            fns = {
                "kernel": scanned(lambda x, p: qmatmul(x, layout, p, threads=args.threads, activations=args.activations)),
                "xla-q": scanned(lambda x, p: quant.einsum("mk,nk->mn", x, quant.QuantArray(
                    p, layout, out_ndim=1, contract_first=False, contract_inner=(), dtype="float32"))),
                "f32": scanned(lambda x, w: jnp.einsum("mk,nk->mn", x, w)),
            }
            for m in map(int, args.m.split(",")):
                x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
                t = time_interleaved(fns, {"kernel": (x, parts), "xla-q": (x, parts), "f32": (x, w32)}, args.reps)
                t = {name: v / layers for name, v in t.items()}
                flop = 2 * m * n * k / 1e9
                print(f"{layout:13s} {k:5d} {n:6d} {m:4d} | {1e3 * t['kernel']:9.3f} {bytes_q / 1e9 / t['kernel']:5.1f} "
                      f"{100 * bytes_q / 1e9 / t['kernel'] / peak:4.0f} {flop / t['kernel']:5.0f} | "
                      f"{1e3 * t['xla-q']:8.3f} {flop / t['xla-q']:5.0f} | {1e3 * t['f32']:7.3f} "
                      f"{n * k * 4 / 1e9 / t['f32']:5.1f} {flop / t['f32']:5.0f} | {t['xla-q'] / t['kernel']:7.2f}x "
                      f"{t['f32'] / t['kernel']:5.2f}x | {os.getloadavg()[0]:.2f}", flush=True)
            del parts, w32
    x = jnp.asarray(rng.normal(size=(1, 576)).astype(np.float32))
    for layout in args.layouts.split(","):  # accuracy on this probe's random data, one line per layout
        p = random_parts(layout, 576, 576, 1, rng)
        p = {name: v[0] for name, v in p.items()}
        want = qmatmul_reference(x, layout, p)
        for acts in ("int8", "float32"):
            err = jnp.abs(qmatmul(x, layout, p, activations=acts) - want)
            print(f"accuracy {layout} {acts} activations: max abs err {float(err.max()):.3g}, "
                  f"relative to max |y| {float(err.max() / jnp.abs(want).max()):.3g}")


if __name__ == "__main__":
    main()
