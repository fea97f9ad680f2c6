"""Whole-model decode on the CPU by weight path: f32, and the default model's Q4_1 through each quantized matmul.

    python profiles/probes/cpu_model_decode.py [--tokens 64] [--rounds 2]

64 greedy tokens (ignore_eos) after a 12-token prompt per jaxinfer.generate call, tok/s including the prefill,
the paths interleaved in one process, the 1-minute load average beside each figure (a shared machine says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jaxinfer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    greedy = jaxinfer.SamplingParams(temperature=0.0, ignore_eos=True)
    prompt = ["Tell me a story about a dog who learns to fly."]
    quantized = jaxinfer.load_model()
    models = {"f32": jaxinfer.load_model(quantize="none")}
    models.update({m: dataclasses.replace(quantized, quantized_matmul=m) for m in jaxinfer.QUANTIZED_MATMULS})
    for model in models.values():  # compile every path first (max_new_tokens is static: the same count)
        jaxinfer.generate(model, prompt, max_new_tokens=args.tokens, sampling=greedy)
    for _ in range(args.rounds):
        for name, model in models.items():
            t = time.perf_counter()
            jaxinfer.generate(model, prompt, max_new_tokens=args.tokens, sampling=greedy)
            rate = args.tokens / (time.perf_counter() - t)
            print(f"{name:12s} {rate:6.1f} tok/s   load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
