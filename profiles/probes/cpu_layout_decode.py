"""Scanned against unrolled layers on the CPU, the default model's Q4_1 through the kernels (and f32 with --f32):
first-call time (trace + compile + run), generate's decode and the engine's decode step, interleaved; and unrolled
with XLA's dots for every matmul (quantized_matmul="xla": no kernel reads a weight).

    python profiles/probes/cpu_layout_decode.py [--tokens 128] [--rounds 3] [--f32]

generate: 128 greedy tokens (ignore_eos) after a 12-token prompt, tok/s including the prefill. engine: one request,
ms per step over 64 decode steps (the engine's host work included). The 1-minute load average beside each figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jaxinfer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--f32", action="store_true", help="float32 weights (--quantize none) instead of the file's Q4_1")
    args = p.parse_args()
    greedy = jaxinfer.SamplingParams(temperature=0.0, ignore_eos=True)
    prompt = ["Tell me a story about a dog who learns to fly."]
    quantize = "none" if args.f32 else "auto"
    models = {layout: jaxinfer.load_model(quantize=quantize, layout=layout) for layout in ("scanned", "unrolled")}
    models["unrolled-xla"] = dataclasses.replace(models["unrolled"], quantized_matmul="xla")  # no CPU kernels
    engines = {}
    for layout, model in models.items():
        t = time.perf_counter()
        jaxinfer.generate(model, prompt, max_new_tokens=args.tokens, sampling=greedy)
        first = time.perf_counter() - t
        engines[layout] = jaxinfer.Engine(model, max_slots=16, warm_up=False)
        t = time.perf_counter()
        engines[layout].generate(prompt, max_new_tokens=4, sampling=greedy)
        print(f"{layout:12s} first generate call {first:5.1f} s, first engine call {time.perf_counter() - t:5.1f} s")
    for _ in range(args.rounds):
        for layout, model in models.items():
            t = time.perf_counter()
            jaxinfer.generate(model, prompt, max_new_tokens=args.tokens, sampling=greedy)
            rate = args.tokens / (time.perf_counter() - t)
            engine = engines[layout]
            steps = engine.metrics()["steps"]
            t = time.perf_counter()
            engine.generate(prompt, max_new_tokens=64, sampling=greedy)
            step_ms = 1e3 * (time.perf_counter() - t) / (engine.metrics()["steps"] - steps)
            print(f"{layout:12s} generate {rate:6.1f} tok/s   engine {step_ms:5.2f} ms/step   "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
