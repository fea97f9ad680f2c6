"""Serving benchmark: the engine (continuous batching) against static batching, on offline-generated workloads; or
the same workloads over HTTP against a running OpenAI-compatible server (`jaxinfer serve`).

    python scripts/bench_serving.py --workload sharegpt --num-requests 64 --preset smollm2-135m
    python scripts/bench_serving.py --workload shared-prefix --groups 4 --prompts-per-group 8 --prefix-len 512
    python scripts/bench_serving.py --workload victim --prefill-chunk 32
    python scripts/bench_serving.py --workload sharegpt --rate 2 --save-schedule s.json   # Poisson arrivals
    python scripts/bench_serving.py --load-schedule s.json                                 # the same, replayed
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --workload sharegpt --concurrency 1,8,32
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --rate 1 --seed 1           # Poisson, over HTTP

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

Closed loop (--concurrency 1,8,32): C requests in flight, the next sent (added) as one finishes, arrivals ignored; one
row per level ("c=C"), each level a fresh engine and the workload's prompts under its own permutation of the
vocabulary (level 0 the identity), so equal prefixes stay equal within a level and no level is served from another's
prefix cache.

Over HTTP (--url; the victim workload runs in-process only): the model name from GET /v1/models (or
--served-model-name), the prompts random token ids over --preset's vocabulary (smollm2-135m's 49,152 is the
embedded default model's), each request a greedy streamed POST /v1/completions with ignore_eos and max_tokens its
output length. TTFT is to the first event with a choice, ITL between such events (one may carry several tokens:
as `vllm bench serve`, ITL is per event and TPOT divides by tokens), the output tokens usage.completion_tokens. A
request answered with an HTTP error, a stream broken before [DONE], an output length other than max_tokens or
--request-timeout passing is counted failed, and the summary is over the completed ones. A server keeps its prefix
cache between runs: give each run against one server its own --seed. The overhead of the HTTP layer per output
token, at matching settings (`jaxinfer serve` defaults to 16 slots, 512 tokens per step, the GGUF as float32):

    jaxinfer serve --port 8011 &
    B="python scripts/bench_serving.py --workload sharegpt --num-requests 32 --concurrency 1,8,32"
    $B --url http://127.0.0.1:8011
    $B --no-static --max-slots 16 --max-tokens-per-step 512 --dtype float32

HTTP TPOT - in-process TPOT at each level is the HTTP layer's cost per output token (run them one after the other
on a quiet machine: they are not interleaved).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import sys
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


def run_engine(engine, reqs: list[Req], concurrency: int | None = None) -> tuple[list[float], list[list[float]]]:
    """-> (each request's start, its token times), seconds after the start. Open loop (concurrency None): each request
    added as its arrival time passes, its start that arrival; closed loop: `concurrency` requests in flight, the next
    added (and started) as one finishes."""
    starts, times = [r.arrival for r in reqs], [[] for _ in reqs]
    ids = {}
    in_flight = 0
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(reqs) and (reqs[i].arrival <= now if concurrency is None else in_flight < concurrency):
            rid = engine.add_request(reqs[i].prompt, sampling=GREEDY, max_new_tokens=reqs[i].output_len, seed=i)
            ids[rid] = i
            if concurrency is not None:
                starts[i] = now
            in_flight += 1
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, reqs[i].arrival - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            if out.new_token_ids:
                times[ids[out.request_id]].append(now)
            in_flight -= out.finish_reason is not None
    return starts, times


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


def summarize(starts: list[float], times: list[list[float]], slo_ttft: float, slo_tpot: float,
              output_tokens: list[int] | None = None) -> dict:
    """starts: when each request was sent; times: when each of its tokens came, or (output_tokens given: over HTTP,
    where one event may carry several tokens) each of its token-bearing events. TPOT divides by tokens, ITL is per
    event (as `vllm bench serve`)."""
    n = [len(t) for t in times] if output_tokens is None else output_tokens
    ttft = np.array([t[0] - s for s, t in zip(starts, times)])
    e2e = np.array([t[-1] - s for s, t in zip(starts, times)])
    tpot = np.array([(t[-1] - t[0]) / (k - 1) for t, k in zip(times, n) if k > 1])
    itl = np.concatenate([np.diff(t) for t in times if len(t) > 1] or [np.zeros(0)])
    duration = max(t[-1] for t in times) - min(starts)
    tokens = sum(n)
    good = sum(
        (t[0] - s) <= slo_ttft and (k < 2 or (t[-1] - t[0]) / (k - 1) <= slo_tpot)
        for s, t, k in zip(starts, times, n)
    )

    def stats(x):
        if len(x) == 0:
            return {"mean": None, "median": None, "p99": None}
        return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p99": float(np.percentile(x, 99))}

    return {
        "duration_s": duration, "requests": len(times), "output_tokens": tokens,
        "request_throughput": len(times) / duration, "output_throughput": tokens / duration,
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


def relabeled(reqs: list[Req], vocab: int, seed: int, level: int) -> list[Req]:
    """The workload of concurrency level `level`: its token ids through a permutation of the vocabulary (level 0's
    the identity), so prefixes shared within the level stay shared and no level hits another's cached prefixes."""
    if level == 0:
        return reqs
    perm = np.random.default_rng([seed, level]).permutation(vocab)
    return [dataclasses.replace(r, prompt=perm[r.prompt].tolist()) for r in reqs]


# ------------------------------------------------------------------------------------------------ over HTTP


class ServerUnreachable(Exception):
    pass


@dataclasses.dataclass
class Sent:
    """One request over HTTP, in seconds after the start: when it was sent and when each token-bearing event came."""

    start: float
    events: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int | None = None  # usage.completion_tokens
    error: str | None = None  # why it failed; None: it completed with its full output length


async def served_model(client, url: str) -> dict:
    """GET /v1/models -> the first model card; ServerUnreachable (one line naming the URL) if nothing answers it."""
    import httpx

    try:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]
    except (httpx.HTTPError, ValueError, LookupError, TypeError) as e:
        raise ServerUnreachable(f"bench_serving: no OpenAI-compatible server at {url} ({_one_line(e)})") from None


async def stream_request(client, model: str, req: Req, start: float, t0: float, timeout: float) -> Sent:
    """One greedy streamed completion of req's output length; whatever fails is this request's error, not the run's."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent, done = Sent(start), False
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    sent.error = f"HTTP {r.status_code}: {_error_message(r)}"
                    return sent
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue  # the blank line between events
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk["choices"]:
                        sent.events.append(time.perf_counter() - t0)
                    if chunk.get("usage"):
                        sent.output_tokens = chunk["usage"]["completion_tokens"]
    except TimeoutError:
        sent.error = f"no full answer in --request-timeout {timeout:g} s"
        return sent
    except Exception as e:  # a broken connection or a malformed event fails this request; the others go on
        sent.error = _one_line(e)
        return sent
    if not done:
        sent.error = "the stream ended before data: [DONE]"
    elif sent.output_tokens != req.output_len or not sent.events:
        sent.error = f"{sent.output_tokens} output tokens in {len(sent.events)} events, not max_tokens {req.output_len}"
    return sent


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, LookupError, TypeError):
        return r.text[:200]


async def send_all(client, model: str, reqs: list[Req], concurrency: int | None, timeout: float) -> list[Sent]:
    """Open loop (concurrency None): each request sent at its arrival, its start that arrival. Closed loop:
    `concurrency` workers, each sending the next request as its last one finishes."""
    t0 = time.perf_counter()
    if concurrency is None:
        async def at_arrival(r: Req) -> Sent:
            await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
            return await stream_request(client, model, r, r.arrival, t0, timeout)

        return list(await asyncio.gather(*map(at_arrival, reqs)))
    sent: list[Sent | None] = [None] * len(reqs)
    todo = iter(range(len(reqs)))  # shared by the workers: each takes the next index

    async def worker():
        for i in todo:
            sent[i] = await stream_request(client, model, reqs[i], time.perf_counter() - t0, t0, timeout)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(reqs)))))
    return sent


def http_summary(sent: list[Sent], slo: tuple[float, float]) -> dict:
    done = [x for x in sent if x.error is None]
    failures = collections.Counter(x.error for x in sent if x.error is not None)
    s = {}
    if done:
        s = summarize([x.start for x in done], [x.events for x in done], *slo, [x.output_tokens for x in done])
    return {**s, "completed": len(done), "failed": len(sent) - len(done), "failures": dict(failures),
            "events": sum(len(x.events) for x in done)}


async def main_http(args, cfg, slo: tuple[float, float], result: dict) -> None:
    import httpx

    pool = max(args.concurrency) + 1 if args.concurrency else None  # none waits for a connection; open loop: no bound
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=timeout, headers=headers,
                                 trust_env=False) as client:
        card = await served_model(client, args.url)
        model = args.served_model_name or card["id"]
        context = min(cfg.max_position_embeddings, card.get("max_model_len") or math.inf)
        print(f"{args.url}: model {model} (context {context}), prompts over {args.preset}'s vocabulary of "
              f"{cfg.vocab_size}, {_load_average()}")
        result["server"] = {"url": args.url, "model": model, "context": context}
        reqs = workload(args, cfg.vocab_size, context)
        runs = {}
        for level, c in enumerate(args.concurrency or [None]):
            sent = await send_all(client, model, relabeled(reqs, cfg.vocab_size, args.seed, level), c,
                                  args.request_timeout)
            name = f"http rate {args.rate:g}" if c is None else f"http c={c}"
            runs[name] = dict(http_summary(sent, slo), load_average=os.getloadavg())
            run = runs[name]
            if run["completed"]:
                print_row(name, run)
            else:
                print(f"{name:<22} no request completed")
            reasons = "".join(f"; {k} x {why}" for why, k in collections.Counter(run["failures"]).most_common(3))
            print(f"{'':<22} {run['completed']} of {len(sent)} completed, {run['failed']} failed{reasons}; "
                  f"{run['events']} token events for {run.get('output_tokens', 0)} output tokens; {_load_average()}")
            if run["events"] < 0.9 * run.get("output_tokens", 0):
                print(f"{'':<22} fewer events than tokens (a token that completes no text streams no event; without "
                      "a tokenizer a request is one event): ITL is per event, TPOT from first to last event")
    result["runs"] = runs


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


def workload(args, vocab: int, context: int) -> list[Req]:
    """The run's requests: built (and saved with --save-schedule), or replayed with --load-schedule; printed."""
    if args.load_schedule:
        with open(args.load_schedule) as f:
            saved = json.load(f)
        reqs = [Req(r["arrival"], r["prompt"], r["output_len"]) for r in saved["requests"]]
    else:
        reqs = build_workload(args, vocab, context)
    if args.save_schedule:
        with open(args.save_schedule, "w") as f:
            json.dump({"workload": args.workload, "requests": [dataclasses.asdict(r) for r in reqs]}, f)
    lens = np.array([len(r.prompt) for r in reqs]), np.array([r.output_len for r in reqs])
    load = f"concurrency {','.join(map(str, args.concurrency))}" if args.concurrency else f"rate {args.rate} req/s"
    print(f"{args.workload}: {len(reqs)} requests, input median {np.median(lens[0]):.0f} (max {lens[0].max()}), "
          f"output median {np.median(lens[1]):.0f} (max {lens[1].max()}), {load}")
    return reqs


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
    p.add_argument("--concurrency", type=_levels, default=None,
                   help="closed loop instead of arrivals: e.g. 1,8,32, one run (row) per level of requests in flight")
    p.add_argument("--url", default=None,
                   help="benchmark a running OpenAI-compatible server here (e.g. http://127.0.0.1:8000) instead of "
                        "the in-process engine; sharegpt, fixed and shared-prefix only (victim runs in-process)")
    p.add_argument("--served-model-name", default=None,
                   help="--url: the requests' model (default: the first of GET /v1/models)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="--url: seconds for one request, all of it")
    p.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                   help="--url: sent as Authorization: Bearer KEY (default: $JAXINFER_API_KEY, as jaxinfer serve's)")
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
    if args.url and args.workload == "victim":
        p.error("--workload victim runs in-process only (drop --url)")
    if args.concurrency and not math.isinf(args.rate):
        p.error("--rate and --concurrency are two ways to load it: give one")
    kept = {k: v for k, v in vars(args).items() if k != "api_key" and not (isinstance(v, float) and math.isinf(v))}
    result = {"args": kept, "load_average": os.getloadavg()}
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)

    if args.url:
        try:
            asyncio.run(main_http(args, jaxinfer.ModelConfig.preset(args.preset), slo, result))
        except ServerUnreachable as e:
            print(e, file=sys.stderr)
            raise SystemExit(2) from None
        return _write(args, result)

    base = jaxinfer.random_model(args.preset, dtype=args.dtype)
    model = jaxinfer.Model(base.cfg.replace(eos_token_ids=()), base.params)  # outputs run their full length
    cfg = model.cfg
    print(f"{args.preset} {cfg.dtype} layers {cfg.num_layers}, jax {jaxinfer_jax_version()}, {_load_average()}, "
          f"max_slots {args.max_slots}, max_tokens_per_step {args.max_tokens_per_step}, "
          f"prefill_chunk {args.prefill_chunk or 'default'}")

    if args.workload == "victim":
        v = victim(model, args)
        print(f"victim alone {v['victim_solo_tok_s']:.1f} tok/s; while a {v['attacker_len']}-token prompt prefills "
              f"({v['attacker_ttft_s']:.1f} s) {v['victim_tok_s_during_prefill']:.1f} tok/s: {100 * v['ratio']:.0f}% "
              f"of alone; engine {v['engine']}")
        result["victim"] = v
        return _write(args, result)

    reqs = workload(args, cfg.vocab_size, cfg.max_position_embeddings)
    caching = args.prefix_caching or ("both" if args.workload == "shared-prefix" else "on")
    runs = {}
    for on in {"on": [True], "off": [False], "both": [True, False]}[caching]:
        for level, c in enumerate(args.concurrency or [None]):
            engine = make_engine(model, args, prefix_caching=on)
            starts, times = run_engine(engine, relabeled(reqs, cfg.vocab_size, args.seed, level), c)
            name = f"engine prefix {'on' if on else 'off'}" + ("" if c is None else f" c={c}")
            runs[name] = dict(summarize(starts, times, *slo), engine=engine_counters(engine),
                              load_average=os.getloadavg())
            print_row(name, runs[name])
            print(f"{'':<22} {runs[name]['engine']}; {_load_average()}")
    if not args.no_static:
        run_static(model, reqs, args.max_slots, compile_only=True)  # untimed: compiles what the timed pass runs
        with CompileCount() as compiles:
            times = run_static(model, reqs, args.max_slots)
            runs["static batching"] = summarize([r.arrival for r in reqs], times, *slo)
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


def _load_average() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give request counts >= 1, comma-separated, e.g. 1,8,32")
    return levels


def _write(args, result: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
