"""Serving benchmark: the engine (continuous batching) against static batching, on offline-generated workloads.

    python scripts/bench_serving.py --workload sharegpt --num-requests 64 --preset smollm2-135m
    python scripts/bench_serving.py --workload shared-prefix --groups 4 --prompts-per-group 8 --prefix-len 512
    python scripts/bench_serving.py --workload victim --prefill-chunk 32
    python scripts/bench_serving.py --workload sharegpt --rate 2 --save-schedule s.json   # Poisson arrivals
    python scripts/bench_serving.py --load-schedule s.json                                 # the same, replayed

Workloads (token ids random, no download): `sharegpt` (input and output lengths log-normal, medians 135 and 132,
sigma 1.1 and 0.8, 4 <= input <= 1024, input + output <= 2048), `fixed` (--input-len, --output-len),
`shared-prefix` (G groups x P prompts sharing an S-token prefix), `victim` (one long decode; a 4,000-token prompt
arrives once it has 16 tokens: the victim's tok/s while that prompt prefills, against its tok/s alone).
Arrivals: all at t=0 (--rate inf) or Poisson at --rate requests/s; a schedule saved with --save-schedule replays
exactly. Each run reports what `vllm bench serve` does (request and output-token throughput; TTFT, TPOT, ITL and
end-to-end latency mean / median / p99; goodput at --slo-ttft-ms / --slo-tpot-ms) plus the engine's counters. Static
batching (jaxinfer.generate_stream in batches of --max-slots, in arrival order, each batch once its last request has
arrived) runs the same workload in the same process after an untimed pass that compiles its programs (each batch to
its second streamed chunk; the timed pass's compile count is printed). Outputs
ignore EOS (the model's EOS ids are dropped), so every request decodes its output length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from jax import monitoring

import jaxinfer

GREEDY = jaxinfer.SamplingParams(temperature=0.0)


@dataclasses.dataclass
class Req:
    arrival: float  # seconds after the start
    prompt: list[int]
    output_len: int


# ------------------------------------------------------------------------------------------------ workloads


def sharegpt(n: int, vocab: int, rng, context: int) -> list[tuple[list[int], int]]:
    out = []
    while len(out) < n:
        i = round(rng.lognormal(math.log(135), 1.1))
        o = max(1, round(rng.lognormal(math.log(132), 0.8)))
        if 4 <= i <= 1024 and i + o <= min(2048, context):
            out.append((rng.integers(0, vocab, i).tolist(), o))
    return out


def fixed(n: int, vocab: int, rng, input_len: int, output_len: int):
    return [(rng.integers(0, vocab, input_len).tolist(), output_len) for _ in range(n)]


def shared_prefix(vocab: int, rng, groups: int, per_group: int, prefix_len: int, input_len: int, output_len: int):
    out = []
    for _ in range(groups):
        prefix = rng.integers(0, vocab, prefix_len).tolist()
        out += [(prefix + rng.integers(0, vocab, input_len).tolist(), output_len) for _ in range(per_group)]
    order = rng.permutation(len(out))  # groups interleaved, as users arrive
    return [out[i] for i in order]


def arrivals(n: int, rate: float, rng) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    return np.cumsum(rng.exponential(1.0 / rate, n)).tolist()


# ------------------------------------------------------------------------------------------------ runs


def run_engine(engine, reqs: list[Req]) -> list[list[float]]:
    """Token times (seconds after the start) per request, the requests added as their arrival times pass."""
    times: dict[int, list[float]] = {}
    ids = {}
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(reqs) and reqs[i].arrival <= now:
            rid = engine.add_request(reqs[i].prompt, sampling=GREEDY, max_new_tokens=reqs[i].output_len, seed=i)
            ids[rid] = i
            times[i] = []
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, reqs[i].arrival - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            if out.new_token_ids:
                times[ids[out.request_id]].append(now)
    return [times[i] for i in range(len(reqs))]


def run_static(model, reqs: list[Req], batch_size: int, compile_only: bool = False) -> list[list[float]]:
    """jaxinfer.generate_stream on batches of batch_size, in arrival order, one batch after another.

    compile_only: each batch only until its second streamed chunk (its prefill, the decode start and one
    continuation: every program its whole run uses), no waiting for arrivals; the timing is not for use."""
    times = [[] for _ in reqs]
    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch_size):
        batch = list(range(start, min(start + batch_size, len(reqs))))
        if not compile_only:
            time.sleep(max(0.0, reqs[batch[-1]].arrival - (time.perf_counter() - t0)))
        stream = jaxinfer.generate_stream(
            model, [reqs[i].prompt for i in batch], max_new_tokens=[reqs[i].output_len for i in batch],
            sampling=GREEDY, seed=list(batch),
        )
        for n, chunk in enumerate(stream):
            now = time.perf_counter() - t0
            for i, new in zip(batch, chunk.new_tokens):
                times[i] += [now] * len(new)
            if compile_only and n == 1:
                stream.close()
                break
    return times


class CompileCount:
    """Programs lowered while it is open (jax.monitoring's public hook, as the engine's runner counts)."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __enter__(self):
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def _on_event(self, name, seconds, **kwargs):
        self.count += name == self.EVENT

    def __exit__(self, *exc):
        monitoring.unregister_event_duration_listener(self._on_event)


def summarize(reqs: list[Req], times: list[list[float]], slo_ttft: float, slo_tpot: float) -> dict:
    ttft = np.array([t[0] - r.arrival for r, t in zip(reqs, times)])
    e2e = np.array([t[-1] - r.arrival for r, t in zip(reqs, times)])
    tpot = np.array([(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1])
    itl = np.concatenate([np.diff(t) for t in times if len(t) > 1] or [np.zeros(0)])
    duration = max(t[-1] for t in times) - min(r.arrival for r in reqs)
    tokens = sum(len(t) for t in times)
    good = sum(
        (t[0] - r.arrival) <= slo_ttft and (len(t) < 2 or (t[-1] - t[0]) / (len(t) - 1) <= slo_tpot)
        for r, t in zip(reqs, times)
    )

    def stats(x):
        if len(x) == 0:
            return {"mean": None, "median": None, "p99": None}
        return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p99": float(np.percentile(x, 99))}

    return {
        "duration_s": duration, "requests": len(reqs), "output_tokens": tokens,
        "request_throughput": len(reqs) / duration, "output_throughput": tokens / duration,
        "goodput": good / duration, "ttft_s": stats(ttft), "tpot_s": stats(tpot), "itl_s": stats(itl),
        "e2e_s": stats(e2e),
    }


def engine_counters(engine) -> dict:
    m = engine.metrics()
    keep = ("preemptions", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "compilations_after_warm_up",
            "warm_up_seconds", "steps", "computed_tokens", "padded_tokens", "padded_tokens_per_step")
    return {k: m[k] for k in keep}


def victim(model, args) -> dict:
    """The victim's decode tok/s alone, then while a --attacker-len prompt prefills beside it."""
    rng = np.random.default_rng(args.seed)
    vocab = model.cfg.vocab_size
    victim_prompt = rng.integers(0, vocab, 16).tolist()
    attacker_prompt = rng.integers(0, vocab, args.attacker_len).tolist()
    engine = make_engine(model, args, prefix_caching=False)

    def decode(with_attacker: bool):
        rid = engine.add_request(victim_prompt, sampling=GREEDY, max_new_tokens=args.victim_len)
        victim_times, window = [], None
        attacker = None
        while engine.has_unfinished():
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                if out.request_id == rid:
                    victim_times.append(now)
                elif out.request_id == attacker and window is not None and window[1] is None:
                    window[1] = now
            if with_attacker and attacker is None and len(victim_times) >= 16:
                attacker = engine.add_request(attacker_prompt, sampling=GREEDY, max_new_tokens=1)
                window = [time.perf_counter(), None]
        return np.array(victim_times), window

    alone, _ = decode(False)
    beside, (start, end) = decode(True)
    assert end is not None and beside[-1] > end, "the victim ended before the attacker's prefill: raise --victim-len"
    during = np.flatnonzero((beside >= start) & (beside <= end))  # the victim's tokens while the prompt prefilled
    rate = len(during) / (end - start)
    # Alone over the same tokens of its output (a decode slows as its context grows: the whole run's rate would
    # flatter the ratio when the prefill covers only its early tokens).
    first, last = max(during[0] - 1, 0), during[-1]
    solo = (last - first) / (alone[last] - alone[first])
    return {"victim_solo_tok_s": solo, "victim_tok_s_during_prefill": rate, "ratio": rate / solo,
            "attacker_ttft_s": end - start, "attacker_len": args.attacker_len, "engine": engine_counters(engine)}


def make_engine(model, args, prefix_caching: bool):
    return jaxinfer.Engine(model, max_slots=args.max_slots, max_tokens_per_step=args.max_tokens_per_step,
                           prefill_chunk=args.prefill_chunk, prefix_caching=prefix_caching, num_pages=args.num_pages)


# ------------------------------------------------------------------------------------------------ main


def build_workload(args, vocab: int, context: int) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    if args.workload == "sharegpt":
        pairs = sharegpt(args.num_requests, vocab, rng, context)
    elif args.workload == "fixed":
        pairs = fixed(args.num_requests, vocab, rng, args.input_len, args.output_len)
    else:
        pairs = shared_prefix(vocab, rng, args.groups, args.prompts_per_group, args.prefix_len, args.input_len,
                              args.output_len)
    times = arrivals(len(pairs), args.rate, rng)
    return [Req(t, p, o) for t, (p, o) in zip(times, pairs)]


def print_row(name: str, s: dict) -> None:
    ms = {k: {q: None if v is None else 1e3 * v for q, v in s[k].items()} for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s")}

    def f(x):
        return "-" if x is None else f"{x:.0f}"

    print(f"{name:<22} {s['request_throughput']:6.2f} req/s {s['output_throughput']:7.1f} tok/s  "
          f"TTFT {f(ms['ttft_s']['mean'])}/{f(ms['ttft_s']['median'])}/{f(ms['ttft_s']['p99'])}  "
          f"TPOT {f(ms['tpot_s']['mean'])}/{f(ms['tpot_s']['median'])}/{f(ms['tpot_s']['p99'])}  "
          f"ITL {f(ms['itl_s']['mean'])}/{f(ms['itl_s']['median'])}/{f(ms['itl_s']['p99'])}  "
          f"E2E {f(ms['e2e_s']['mean'])}/{f(ms['e2e_s']['median'])}/{f(ms['e2e_s']['p99'])}  "
          f"goodput {s['goodput']:.2f} req/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("sharegpt", "fixed", "shared-prefix", "victim"), default="sharegpt")
    p.add_argument("--preset", default="smollm2-135m", help="random weights of configs/<name>.json")
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32, help="fixed: prompt; shared-prefix: each prompt's own part")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--victim-len", type=int, default=512, help="victim: its output tokens")
    p.add_argument("--attacker-len", type=int, default=4000, help="victim: the long prompt's tokens")
    p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at t=0)")
    p.add_argument("--save-schedule", default=None, help="write the workload (arrivals, prompts) here")
    p.add_argument("--load-schedule", default=None, help="replay a saved workload")
    p.add_argument("--max-slots", type=int, default=16)
    p.add_argument("--max-tokens-per-step", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--prefix-caching", choices=("on", "off", "both"), default=None,
                   help="default: both for shared-prefix, on otherwise")
    p.add_argument("--no-static", action="store_true", help="skip the static-batching run")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    base = jaxinfer.random_model(args.preset, dtype=args.dtype)
    model = jaxinfer.Model(base.cfg.replace(eos_token_ids=()), base.params)  # outputs run their full length
    cfg = model.cfg
    load = os.getloadavg()
    print(f"{args.preset} {cfg.dtype} layers {cfg.num_layers}, jax {jaxinfer_jax_version()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, max_slots {args.max_slots}, "
          f"max_tokens_per_step {args.max_tokens_per_step}, prefill_chunk {args.prefill_chunk or 'default'}")
    result = {"args": {k: v for k, v in vars(args).items() if not (isinstance(v, float) and math.isinf(v))},
              "load_average": load}

    if args.workload == "victim":
        v = victim(model, args)
        print(f"victim alone {v['victim_solo_tok_s']:.1f} tok/s; while a {v['attacker_len']}-token prompt prefills "
              f"({v['attacker_ttft_s']:.1f} s) {v['victim_tok_s_during_prefill']:.1f} tok/s: {100 * v['ratio']:.0f}% "
              f"of alone; engine {v['engine']}")
        result["victim"] = v
        return _write(args, result)

    if args.load_schedule:
        with open(args.load_schedule) as f:
            saved = json.load(f)
        reqs = [Req(r["arrival"], r["prompt"], r["output_len"]) for r in saved["requests"]]
    else:
        reqs = build_workload(args, cfg.vocab_size, cfg.max_position_embeddings)
    if args.save_schedule:
        with open(args.save_schedule, "w") as f:
            json.dump({"workload": args.workload, "requests": [dataclasses.asdict(r) for r in reqs]}, f)
    lens = np.array([len(r.prompt) for r in reqs]), np.array([r.output_len for r in reqs])
    print(f"{args.workload}: {len(reqs)} requests, input median {np.median(lens[0]):.0f} (max {lens[0].max()}), "
          f"output median {np.median(lens[1]):.0f} (max {lens[1].max()}), rate {args.rate} req/s")
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    caching = args.prefix_caching or ("both" if args.workload == "shared-prefix" else "on")
    runs = {}
    for on in {"on": [True], "off": [False], "both": [True, False]}[caching]:
        engine = make_engine(model, args, prefix_caching=on)
        times = run_engine(engine, reqs)
        name = f"engine prefix {'on' if on else 'off'}"
        runs[name] = dict(summarize(reqs, times, *slo), engine=engine_counters(engine))
        print_row(name, runs[name])
        print(f"{'':<22} {runs[name]['engine']}")
    if not args.no_static:
        run_static(model, reqs, args.max_slots, compile_only=True)  # untimed: compiles what the timed pass runs
        with CompileCount() as compiles:
            runs["static batching"] = summarize(reqs, run_static(model, reqs, args.max_slots), *slo)
        runs["static batching"]["compilations_in_timed_pass"] = compiles.count
        print_row("static batching", runs["static batching"])
        print(f"{'':<22} compilations in the timed pass: {compiles.count}")
        for name, s in runs.items():
            if name.startswith("engine"):
                ratio = s["output_throughput"] / runs["static batching"]["output_throughput"]
                print(f"{name}: {ratio:.2f}x static batching's output tok/s")
    if "engine prefix on" in runs and "engine prefix off" in runs:
        on, off = runs["engine prefix on"]["ttft_s"]["mean"], runs["engine prefix off"]["ttft_s"]["mean"]
        print(f"prefix caching: mean TTFT {1e3 * on:.0f} ms vs {1e3 * off:.0f} ms without, {off / on:.1f}x lower")
    result["runs"] = runs
    _write(args, result)


def jaxinfer_jax_version() -> str:
    return jax.__version__


def _write(args, result: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
