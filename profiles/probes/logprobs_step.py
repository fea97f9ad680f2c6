"""Probe (not a test): what per-token logprobs cost a decode step. One engine step (steps.compute_and_sample) of
random smollm2-135m float32, 16 decode rows at CONTEXT tokens each, want_logprobs False against True (the same
compiled program: log_softmax and a top-20 over the 49,152-token vocabulary under lax.cond), interleaved in one
process, each timed with what the runner transfers to the host (tokens and stops; the logprobs only when wanted);
then the logprobs alone (sampling.logprobs on [16, 49152] logits under jit), the part of the step they add:

    python profiles/probes/logprobs_step.py [reps] [context]
"""

import statistics
import sys
import time

import jax
import numpy as np

import jaxinfer
from jaxinfer import kv_cache, sampling, steps
from jaxinfer.config import ModelConfig
from jaxinfer.runtime import Runtime

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
CONTEXT = int(sys.argv[2]) if len(sys.argv) > 2 else 256
B, PAGE = 16, 16

cfg = ModelConfig.preset("smollm2-135m").replace(dtype="float32")
m = jaxinfer.random_model(cfg)
pps = -(-(CONTEXT + 1) // PAGE)
cache = kv_cache.init_cache(cfg, num_pages=1 + B * pps, page_size=PAGE, max_seqs=B, pages_per_seq=pps)
slots = steps.init_slot_rows(B, 4, cfg.vocab_size)  # every slot greedy: the common decode step
page_table = (1 + np.arange(B * pps, dtype=np.int32)).reshape(B, pps)  # [B, pps]
lengths = np.full((B,), CONTEXT, np.int32)
rows = (steps.StepRows(
    tokens=np.full((B, 1), 5, np.int32), positions=np.full((B, 1), CONTEXT, np.int32),
    seq_ids=np.arange(B, dtype=np.int32), sample=np.ones((B,), bool), output_index=np.zeros((B,), np.int32),
),)


def step(want: bool) -> float:
    global cache, slots
    start = time.perf_counter()
    tok, stopped, logprobs, cache, slots = steps.compute_and_sample(
        m.params, cfg, cache, slots, page_table, lengths, rows, np.bool_(want), runtime=Runtime()
    )
    np.asarray(tok), np.asarray(stopped)
    if want:
        [np.asarray(a) for a in logprobs]
    return 1000 * (time.perf_counter() - start)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


step(False), step(True)  # compile (one program) and warm
print(f"smollm2-135m f32, decode B={B} at {CONTEXT} tokens, {REPS} reps each, interleaved; "
      f"jax {jax.__version__}, {jax.devices()[0].platform}; load average before: {loadavg()}", flush=True)
times = {False: [], True: []}
for i in range(REPS):
    for want in ((False, True) if i % 2 == 0 else (True, False)):
        times[want].append(step(want))
for want, ts in times.items():
    print(f"want_logprobs={want!s:5}  median {statistics.median(ts):6.1f} ms  min {min(ts):6.1f}  max {max(ts):6.1f}  "
          f"(all: {' '.join(f'{t:.0f}' for t in ts)})")
off = statistics.median(times[False])
# Each rep's pair ran back to back: their difference drifts less with the machine's load than either median.
paired = statistics.median(on - off_ for on, off_ in zip(times[True], times[False]))
print(f"logprobs on: {paired:+.1f} ms per step, median of the paired differences ({100 * paired / off:+.1f}%); "
      f"load average after: {loadavg()}")

logits = jax.random.normal(jax.random.key(0), (B, cfg.vocab_size))  # [B, V]
alone = jax.jit(lambda x, t: sampling.logprobs(x, t, steps.MAX_LOGPROBS))
tokens = np.zeros((B,), np.int32)
jax.block_until_ready(alone(logits, tokens))
ts = []
for _ in range(REPS):
    start = time.perf_counter()
    jax.block_until_ready(alone(logits, tokens))
    ts.append(1000 * (time.perf_counter() - start))
print(f"logprobs alone [B={B}, V={cfg.vocab_size}]: median {statistics.median(ts):.2f} ms  min {min(ts):.2f}; "
      f"load average: {loadavg()}")
