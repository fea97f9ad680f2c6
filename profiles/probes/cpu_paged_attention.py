"""Probe (not a test): jaxinfer.cpu_kernels' paged attention against the "xla" backend (blocked_attention), on the
default model's attention shape (N=9, K=3, H=64, page_size 16): decode at batch 1 and 16 over 512 / 2,000 / 8,000
keys, and a 512-token prefill chunk over 2,000 keys. Interleaved, with the load average beside each row (the machine
is shared: compare rows measured at the same load).

Each timing is a jitted lax.scan over L layers of a stacked pool (as many as make >= 64 MB of K/V, so the pages
stream from memory as a decode step's do), the layer index traced, as the decoder calls attention; the figure is per
call. GB/s counts the K/V bytes of the visible keys (what each backend must read at least once).

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/cpu_paged_attention.py [--kv float32|int8] [--repeats 5]
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels.paged_attention import paged_attention
from jaxinfer.xla_attention import blocked_attention

N, K, H, PAGE_SIZE = 9, 3, 64, 16
CASES = [(1, 1, 512), (1, 1, 2000), (1, 1, 8000), (16, 1, 512), (16, 1, 2000), (16, 1, 8000), (1, 512, 2000)]
STREAM_BYTES = 64 << 20


def pool(batch, keys, kv, rng):
    """A stacked pool holding `keys` keys per row in shuffled pages -> (arrays, layers, K/V bytes per layer read)."""
    pages_per_seq = -(-keys // PAGE_SIZE)
    num_pages = batch * pages_per_seq + 1  # page 0: the null page
    vector_bytes = H * (1 if kv == "int8" else 4) + (4 if kv == "int8" else 0)
    layer_bytes = 2 * K * num_pages * PAGE_SIZE * vector_bytes
    layers = max(1, min(30, -(-STREAM_BYTES // layer_bytes)))
    shape = (layers, K, num_pages, PAGE_SIZE, H)
    if kv == "int8":
        k, v = (jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8)) for _ in range(2))
        scales = {name: jnp.asarray(rng.uniform(0.01, 0.02, shape[:-1]).astype(np.float32))
                  for name in ("k_scales", "v_scales")}
    else:
        k, v = (jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2))
        scales = {}
    table = jnp.asarray(1 + rng.permutation(batch * pages_per_seq).reshape(batch, pages_per_seq), jnp.int32)
    read = 2 * K * batch * keys * vector_bytes
    return k, v, scales, table, layers, read


def scanned(attend, layers):
    """f(q, k, v, table, positions, lengths, scales) -> [L, B, T, N, H]: one call per layer of the pool."""
    def run(q, k, v, table, positions, lengths, scales):
        def body(c, layer):
            return c, attend(q, k, v, table, positions, lengths, layer=layer, **scales)
        return jax.lax.scan(body, 0, jnp.arange(layers, dtype=jnp.int32))[1]
    return jax.jit(run)


def timed(f, args, seconds=0.4):
    f(*args).block_until_ready()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        f(*args).block_until_ready()
        n += 1
    return (time.perf_counter() - start) / n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", choices=("float32", "int8"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings per backend; the median is shown")
    args = p.parse_args()
    assert build.available(), build.unavailable_reason()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, kv {args.kv}, N={N} K={K} H={H} page_size {PAGE_SIZE}")
    print(f"{'batch':>5} {'T':>4} {'keys':>5} {'L':>3} | {'kernel ms':>9} {'GB/s':>5} | {'xla ms':>7} {'GB/s':>5} | "
          f"{'xla/kernel':>10} | load (1 min) at each timing")
    for batch, tokens, keys in CASES:
        k, v, scales, table, layers, read = pool(batch, keys, args.kv, rng)
        q = jnp.asarray(rng.normal(size=(batch, tokens, N, H)).astype(np.float32))
        positions = jnp.broadcast_to(jnp.arange(keys - tokens, keys, dtype=jnp.int32), (batch, tokens))
        lengths = jnp.full((batch,), keys, jnp.int32)
        operands = (q, k, v, table, positions, lengths, scales)
        backends = {"kernel": scanned(paged_attention, layers), "xla": scanned(blocked_attention, layers)}
        times, loads = {name: [] for name in backends}, []
        for _ in range(args.repeats):
            for name, f in backends.items():
                times[name].append(timed(f, operands) / layers)
                loads.append(os.getloadavg()[0])
        kernel_s, xla_s = statistics.median(times["kernel"]), statistics.median(times["xla"])
        print(f"{batch:>5} {tokens:>4} {keys:>5} {layers:>3} | {kernel_s * 1e3:>9.3f} {read / kernel_s / 1e9:>5.1f} | "
              f"{xla_s * 1e3:>7.3f} {read / xla_s / 1e9:>5.1f} | {xla_s / kernel_s:>9.2f}x | "
              f"{min(loads):.1f}-{max(loads):.1f}", flush=True)
        del k, v, scales, backends


if __name__ == "__main__":
    main()
