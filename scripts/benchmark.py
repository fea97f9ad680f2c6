"""Prefill and decode speed of a random-weight preset, printed with the roofline terms.

    python scripts/benchmark.py --preset llama-2-7b --batch 1 32 --context 512 --prompt-len 2048 --gpu h100

Decode runs the real product path, `generate_loop` (the whole loop in one jit), over a cache already holding
`--context` tokens per sequence; weights and cache contents are random (speed does not depend on them).
Times are medians over `--iters` runs after `--warmup`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer.timing import median_seconds
from jaxinfer import roofline
from jaxinfer import model as model_lib
from jaxinfer import quant
from jaxinfer.attention import BACKENDS, resolve_backend
from jaxinfer.generate import DEFAULT_PREFILL_CHUNK, allocate_cache, prompt_chunks
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingArrays, SamplingParams, row_keys
from jaxinfer.steps import RowSettings, generate_loop, prefill


def bench_prefill(
    model, batch: int, prompt_len: int, chunk: int, page_size: int, warmup: int, iters: int, runtime=Runtime()
) -> float:
    """Seconds for one prefill of `batch` prompts of `prompt_len` tokens (time to first token, sampling aside), in
    chunks of `chunk` tokens as `generate` runs it."""
    cfg = model.cfg
    T, n = prompt_chunks(prompt_len, chunk)
    cache = allocate_cache(cfg, [prompt_len] * batch, batch, T * n, page_size, None)
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, T * n), np.int32)
    tokens[:, :prompt_len] = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
    positions = np.where(np.arange(T * n) < prompt_len, np.arange(T * n), -1).astype(np.int32)
    positions = np.broadcast_to(positions, (batch, T * n))
    seq_ids = jnp.arange(batch, dtype=jnp.int32)
    state = {"cache": cache}

    def run():
        c = dataclasses.replace(state["cache"], lengths=jnp.zeros((batch,), jnp.int32))
        logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        for start in range(0, T * n, T):
            w = slice(start, start + T)
            logits, c = prefill(model.params, cfg, tokens[:, w], positions[:, w], c, seq_ids, logits, runtime=runtime)
        state["cache"] = c
        return logits

    return median_seconds(run, warmup, iters)


def bench_decode(
    model, batch: int, context: int, steps: int, page_size: int, warmup: int, iters: int, runtime=Runtime()
) -> float:
    """Seconds per decode step: `steps` tokens per sequence from one generate_loop call, divided by steps."""
    cfg = model.cfg
    cache = allocate_cache(cfg, [context + steps] * batch, batch, context + steps, page_size, None)
    cache = dataclasses.replace(cache, lengths=jnp.full((batch,), context, jnp.int32))
    rows = RowSettings(
        seq_ids=jnp.arange(batch, dtype=jnp.int32),
        sampling=SamplingArrays.from_params([SamplingParams(temperature=0.0)] * batch, batch),
        keys=row_keys(0, batch),
        stop_ids=jnp.full((batch, 1), -1, jnp.int32),  # never stop early: every run decodes `steps` tokens
        limits=jnp.full((batch,), steps, jnp.int32),
    )
    seen = jnp.zeros((batch, cfg.vocab_size), bool)
    first_logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    state = {"cache": cache}

    def run():
        # Each run rewrites the same `steps` positions: lengths go back to `context` first.
        c = dataclasses.replace(state["cache"], lengths=jnp.full((batch,), context, jnp.int32))
        out = generate_loop(model.params, cfg, first_logits, c, rows, seen, max_new_tokens=steps, runtime=runtime)
        state["cache"] = out.cache
        return out.tokens

    return median_seconds(run, warmup, iters) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", help="configs/<name>.json or a path")
    p.add_argument("--dtype", default=None, help="override the preset's dtype")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, nargs="+", default=[512], help="tokens already cached per sequence")
    p.add_argument("--prompt-len", type=int, default=2048, help="prefill length for TTFT (0 skips prefill)")
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="tokens per prefill call")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed generate_loop call")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", choices=BACKENDS, default=None, help="default: the platform's")
    p.add_argument("--layout", choices=model_lib.LAYOUTS, default=None,
                   help="layer weights stacked and scanned, or per layer and unrolled (default: the platform's)")
    p.add_argument("--quantize", default="none", choices=jaxinfer.QUANTIZE_CHOICES,
                   help="hold the projections quantized (random codes drawn in the layout: int8, int4, fp8, ...)")
    p.add_argument("--quantized-matmul", default=None, choices=jaxinfer.QUANTIZED_MATMULS,
                   help="how quantized weights meet their activations (default: the CPU kernel where it built)")
    p.add_argument("--gpu", default=None, help=f"peaks for MBU/MFU, one of {sorted(roofline.GPUS)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    gpu = roofline.gpu(args.gpu) if args.gpu else None
    model = jaxinfer.random_model(args.preset, dtype=args.dtype, layout=args.layout, quantize=args.quantize)
    runtime = Runtime(attention_backend=args.attention_backend, quantized_matmul=args.quantized_matmul)
    cfg = model.cfg
    kv_elem = jnp.dtype(cfg.dtype).itemsize
    held = quant.held_bytes(model.params)
    per_param = held / roofline.param_count(cfg)  # bytes per weight as held
    print(
        f"{args.preset} {cfg.dtype} weights {args.quantize} ({held / 1e9:.2f} GB held, {8 * per_param:.2f} bits per "
        f"weight), {roofline.param_count(cfg) / 1e9:.2f} B params, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, page_size {args.page_size}, attention {resolve_backend(args.attention_backend)}, "
        f"layers {model_lib.layout_of(model.params)}, quantized matmul {args.quantized_matmul or 'default'}"
    )
    results = []
    if args.prompt_len:
        b, n = args.prefill_batch, args.prompt_len
        t = bench_prefill(model, b, n, args.prefill_chunk, args.page_size, args.warmup, args.iters, runtime)
        flops = roofline.prefill_flops(cfg, n, b, all_logits=False)
        line = f"prefill batch {b} prompt {n} (chunks of {args.prefill_chunk}): TTFT {1e3 * t:.1f} ms, {b * n / t:.0f} tok/s, {flops / t / 1e12:.2f} TFLOP/s"
        if gpu:
            line += f" ({100 * roofline.mfu(flops, t, gpu):.1f}% MFU on {gpu.name})"
        print(line)
        results.append(dict(kind="prefill", batch=b, prompt_len=n, seconds=t))
    for b in args.batch:
        for c in args.context:
            t = bench_decode(model, b, c, args.steps, args.page_size, args.warmup, args.iters, runtime)
            nbytes = roofline.decode_step_bytes(cfg, b, c, per_param, kv_bytes_per_elem=kv_elem)
            print(f"decode batch {b} context {c}: {1e3 * t:.2f} ms/token, {b / t:.0f} tok/s, {nbytes / t / 1e9:.0f} GB/s")
            if gpu:
                print("  " + roofline.format_roofline(cfg, gpu, b, c, t, weight_bytes_per_param=per_param,
                                                      kv_bytes_per_elem=kv_elem).replace("\n", "\n  "))
            results.append(dict(kind="decode", batch=b, context=c, seconds_per_token=t))
    if args.json:
        meta = dict(preset=args.preset, dtype=cfg.dtype, quantize=args.quantize, weight_bytes=held, jax=jax.__version__,
                    device=jax.devices()[0].device_kind, quantized_matmul=args.quantized_matmul)
        with open(args.json, "w") as f:
            json.dump(dict(meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
