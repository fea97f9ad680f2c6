"""Tensor-parallel generation on one GPU, every GPU of a host, or many hosts: the same command everywhere.

    python scripts/run_sharded.py --preset llama-2-7b --tp 8                      # one host, 8 GPUs
    python scripts/run_sharded.py --preset llama-2-7b --tp 1 --compare-unsharded  # the shard_map layer's cost
    python scripts/run_sharded.py --model path/to/ckpt --tp 16 \\
        --coordinator-address host0:1234 --num-processes 2 --process-id $RANK     # 2 hosts x 8 GPUs

Multi-host: every process runs this same command; --coordinator-address, --num-processes and --process-id
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) go to jax.distributed.initialize, and the
mesh spans the devices of all processes. On CPUs, --cpu-collectives gloo lets processes all-reduce.

Prints the greedy tokens of each prompt (the same on every process and every --tp), the all-reduces of the
compiled decode step, and per-step times: prefill, and decode (the whole generate loop in one program,
divided by its steps, median over --iters). Weights are random for a preset (the tokens then mean nothing,
but they must agree across --tp and process counts) or loaded from --model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.timing import median_seconds  # imports only jax: safe before jax.distributed.initialize


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="random weights: configs/<name>.json or a config path")
    src.add_argument("--model", default=None, help="checkpoint to load (HF directory, orbax, .gguf, 'default')")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: every device)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=32, help="decode steps (tokens per prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compare-unsharded", action="store_true",
                   help="also time the unsharded path with the same weights (they must fit one device)")
    p.add_argument("--profile", default=None, help="trace one generate call into this directory and print the "
                   "share of device time spent in collectives")
    p.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    p.add_argument("--cpu-collectives", default=None, help="'gloo' (or 'mpi') for multi-process CPU runs")
    return p.parse_args(argv)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def initialize_distributed(args) -> None:
    """jax.distributed.initialize when a coordinator or a process count is given; single process otherwise."""
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator_address is None and args.num_processes is None:
        return
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def time_steps(model, batch: int, prompt_len: int, steps: int, warmup: int, iters: int) -> tuple[float, float, str]:
    """(prefill seconds, decode seconds per step, compiled decode-step HLO text) with random tokens."""
    from jaxinfer.generate import allocate_cache
    from jaxinfer.runtime import Runtime
    from jaxinfer.sampling import SamplingArrays, SamplingParams, row_keys
    from jaxinfer.steps import RowSettings, decode_step, generate_loop, prefill

    cfg, mesh = model.cfg, model.mesh
    runtime = Runtime(mesh=mesh)
    capacity = prompt_len + steps
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    seq_ids = np.arange(batch, dtype=np.int32)
    state = {"cache": allocate_cache(cfg, [capacity] * batch, batch, capacity, 16, None, mesh)}

    def run_prefill():
        logits = np.zeros((batch, cfg.vocab_size), np.float32)
        logits, state["cache"] = prefill(
            model.params, cfg, tokens, positions, state["cache"], seq_ids, logits, runtime=runtime
        )
        return logits

    t_prefill = median_seconds(run_prefill, warmup, iters)
    first_logits = run_prefill()
    rows = RowSettings(
        seq_ids=seq_ids,
        sampling=SamplingArrays.from_params([SamplingParams(temperature=0.0)] * batch, batch),
        keys=row_keys(0, batch),
        stop_ids=np.full((batch, 1), -1, np.int32),  # never stop early: every run decodes `steps` tokens
        limits=np.full((batch,), steps, np.int32),
    )
    seen = np.zeros((batch, cfg.vocab_size), bool)

    def run_decode():
        # Each run rewrites the same positions: lengths go back to the prompt first.
        cache = dataclasses.replace(state["cache"], lengths=jnp.full((batch,), prompt_len, jnp.int32))
        out = generate_loop(model.params, cfg, first_logits, cache, rows, seen, max_new_tokens=steps, runtime=runtime)
        state["cache"] = out.cache
        return out.tokens

    t_decode = median_seconds(run_decode, warmup, iters) / steps
    active = np.ones((batch,), bool)
    hlo = decode_step.lower(
        model.params, cfg, np.zeros((batch,), np.int32), state["cache"], seq_ids, active, runtime=runtime
    ).compile().as_text()
    return t_prefill, t_decode, hlo


def main(argv=None) -> None:
    args = parse_args(argv)
    initialize_distributed(args)
    import jaxinfer
    from jaxinfer import model as model_lib
    from jaxinfer import sharding

    tp = jax.device_count() if args.tp is None else args.tp
    if args.model is not None:
        model = jaxinfer.load_model(args.model, args.dtype, tensor_parallel=tp)
        name = args.model
    else:
        cfg = jaxinfer.ModelConfig.preset(args.preset)
        cfg = cfg.replace(eos_token_ids=(), **({"dtype": args.dtype} if args.dtype else {}))  # decode every step
        model = jaxinfer.random_model(cfg, seed=args.seed, tensor_parallel=tp)
        name = f"{args.preset} (random weights)"
    if model.mesh is None:  # tp=1 runs under a 1-device mesh: the sharded program, to compare with the plain one
        unsharded = model
        model = dataclasses.replace(model, params=sharding.to_mesh(model.params, model.cfg, sharding.make_mesh(1)),
                                    mesh=sharding.make_mesh(1))
    else:
        unsharded = None
    cfg = model.cfg
    main_process = jax.process_index() == 0

    def say(text: str) -> None:
        if main_process:
            print(text, flush=True)

    say(f"{name} {cfg.dtype}: jax {jax.__version__}, {jax.process_count()} process(es), {jax.device_count()} "
        f"{jax.devices()[0].device_kind} device(s), tensor_parallel={tp}")

    prompts = [np.random.default_rng(args.seed + i).integers(3, cfg.vocab_size, args.prompt_len).tolist()
               for i in range(args.batch)]
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    for i, out in enumerate(jaxinfer.generate(model, prompts, args.steps, greedy, seed=args.seed)):
        say(f"tokens[{i}]: {out.tokens}")

    t_prefill, t_decode, hlo = time_steps(model, args.batch, args.prompt_len, args.steps, args.warmup, args.iters)
    collectives = sharding.hlo_collectives(hlo)
    # Per decode step: one [B, D] all-reduce after attention and one after the MLP per layer, one for the embedding;
    # with the layers scanned the HLO holds the layer body's two once (run num_layers times).
    reduce_bytes = (2 * cfg.num_layers + 1) * args.batch * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    layout = model_lib.layout_of(model.params)
    in_hlo = 2 * cfg.num_layers if layout == "unrolled" else 2
    expected = in_hlo + 1 if tp > 1 else 0
    say(f"decode step HLO: {collectives['all-reduce']} all-reduces (expected {expected}: {in_hlo} for the "
        f"{cfg.num_layers} {layout} layers + 1 embedding, none at tp=1), {collectives['all-gather']} all-gathers; "
        f"{reduce_bytes / 1e3:.1f} kB all-reduced per step")
    say(f"prefill batch {args.batch} prompt {args.prompt_len}: {1e3 * t_prefill:.2f} ms")
    say(f"decode batch {args.batch}: {1e3 * t_decode:.3f} ms/step, {args.batch / t_decode:.0f} tok/s")
    if args.profile:
        from jaxinfer.trace_summary import collective_share

        with jax.profiler.trace(args.profile):
            jaxinfer.generate(model, prompts, args.steps, greedy, seed=args.seed)
        say(f"communication: {100 * collective_share(args.profile):.1f}% of device time in collectives "
            f"(trace in {args.profile})")
    if args.compare_unsharded:
        if unsharded is None:
            params = jax.device_put(model.params, jax.local_devices()[0])
            unsharded = dataclasses.replace(model, params=params, mesh=None)
        u_prefill, u_decode, _ = time_steps(unsharded, args.batch, args.prompt_len, args.steps, args.warmup,
                                            args.iters)
        say(f"unsharded: prefill {1e3 * u_prefill:.2f} ms, decode {1e3 * u_decode:.3f} ms/step; "
            f"the sharded path costs {100 * (t_decode / u_decode - 1):+.1f}% per decode step")


if __name__ == "__main__":
    main(sys.argv[1:])
