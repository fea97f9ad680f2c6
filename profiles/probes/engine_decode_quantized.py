"""The engine's decode speed on the default model, quantized (Q4_1 kept) against float32, one request greedy.

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/engine_decode_quantized.py auto
    JAXINFER_COMPILATION_CACHE=off python profiles/probes/engine_decode_quantized.py none

Prints ms per output token of a 32-token generation after a warm-up one, the compilations during the timed run
(0 expected) and the load average.
"""

import sys
import time

from jax import monitoring

import jaxinfer

compiles = {"n": 0}


def on_event(name, seconds, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        compiles["n"] += 1


monitoring.register_event_duration_secs_listener(on_event)
quantize = sys.argv[1] if len(sys.argv) > 1 else "auto"
model = jaxinfer.load_model(quantize=quantize)
engine = jaxinfer.Engine(model, max_slots=8, warm_up=False)
ids = model.tokenizer.encode("The capital of France is")
greedy = jaxinfer.SamplingParams(temperature=0.0)
engine.generate([ids], max_new_tokens=4, sampling=greedy)
before, t0 = compiles["n"], time.perf_counter()
engine.generate([ids], max_new_tokens=32, sampling=greedy)
seconds = time.perf_counter() - t0
print(f"{quantize}: {1e3 * seconds / 32:.1f} ms/token, {compiles['n'] - before} compilations, "
      f"load {open('/proc/loadavg').read().split()[0]}")
