"""Capture a jax.profiler trace of one prefill and a few decode steps of a random-weight preset.

    python scripts/profile_trace.py --preset llama-2-7b --batch 8 --prompt-len 512 --decode-steps 8

The trace lands in profiles/traces/<preset>-<timestamp>/ (git-ignored); profiles/README.md says how to read it.
Compilation happens before the trace starts, so the trace holds only the steady-state programs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer.generate import allocate_cache
from jaxinfer.steps import decode_step, prefill

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def run_once(model, batch: int, prompt_len: int, decode_steps: int, page_size: int):
    """One prefill, then decode_steps separate decode_step calls (each its own trace region)."""
    cfg = model.cfg
    cache = allocate_cache(cfg, [prompt_len + decode_steps] * batch, batch, prompt_len + decode_steps, page_size, None)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    seq_ids = jnp.arange(batch, dtype=jnp.int32)
    active = jnp.ones((batch,), bool)
    with jax.profiler.TraceAnnotation("prefill"):
        logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
        logits, cache = prefill(model.params, cfg, tokens, positions, cache, seq_ids, logits)
        jax.block_until_ready(logits)
    for i in range(decode_steps):
        with jax.profiler.TraceAnnotation(f"decode_step_{i}"):
            logits, cache = decode_step(model.params, cfg, jnp.argmax(logits, -1).astype(jnp.int32), cache, seq_ids,
                                        active)
            jax.block_until_ready(logits)
    return cache


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--out", default=None, help="trace directory (default profiles/traces/<preset>-<time>)")
    args = p.parse_args(argv)

    model = jaxinfer.random_model(args.preset, dtype=args.dtype)
    run_once(model, args.batch, args.prompt_len, args.decode_steps, args.page_size)  # compile outside the trace
    out = Path(args.out or PROFILES / "traces" / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    with jax.profiler.trace(str(out)):
        run_once(model, args.batch, args.prompt_len, args.decode_steps, args.page_size)
    print(f"trace written to {out}")


if __name__ == "__main__":
    main()
