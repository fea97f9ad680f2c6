"""Probe (not a test): jaxinfer against llama.cpp's llama-bench on the same GGUF files, batch-1 decode and a 512-token
prefill, interleaved in one run (ours, then llama-bench, per file and round), the 1-minute load average beside each.

    python profiles/probes/cpu_side_by_side.py --gguf A.gguf B.gguf ... \\
        --llama-run ~/.cache/jaxinfer-peers/llama.cpp/run [--threads 2] [--rounds 2] [--quantized-matmul kernel]

Ours: the file loaded as `jaxinfer generate` loads it (`quantize="auto"`: blocks kept as stored, F32 stays float32),
decode = 128 tokens timed as generate(129 tokens) - generate(1 token) after a 1-token prompt (both compiled first;
max_new_tokens is static), EOS ignored; prefill = a 512-token prompt (random ids), generate(1 token), 512 / time.
llama-bench: `-p 512 -n 128 -r R -t T -o json` (its tg128 decodes from an empty context, its pp512 is one batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import jaxinfer


def timed(fn, reps: int) -> float:
    """The median seconds of fn() over reps calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(model, decode_tokens: int, prompt_len: int, reps: int) -> dict[str, float]:
    greedy = jaxinfer.SamplingParams(temperature=0.0, ignore_eos=True)
    one = [[1]]
    prompt = [np.random.default_rng(0).integers(2, model.cfg.vocab_size, prompt_len).tolist()]

    def gen(ids, n):
        return lambda: jaxinfer.generate(model, ids, max_new_tokens=n, sampling=greedy)

    for f in (gen(one, 1), gen(one, decode_tokens + 1), gen(prompt, 1)):
        f()  # compile
    short, long = timed(gen(one, 1), reps), timed(gen(one, decode_tokens + 1), reps)
    prefill = timed(gen(prompt, 1), reps)
    return {"decode": decode_tokens / (long - short), "prefill": prompt_len / prefill}


def llama_bench(run: str, gguf: str, threads: int, reps: int, decode_tokens: int, prompt_len: int) -> dict[str, float]:
    out = subprocess.run([run, "llama-bench", "-m", gguf, "-t", str(threads), "-p", str(prompt_len), "-n",
                          str(decode_tokens), "-r", str(reps), "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    rows = json.loads(out)
    result = {}
    for row in rows:
        key = "prefill" if row["n_prompt"] and not row["n_gen"] else "decode"
        result[key] = row["avg_ts"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", nargs="+", required=True)
    p.add_argument("--llama-run", required=True, help="build-llamacpp.sh's `run` script")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--quantized-matmul", default=None, choices=jaxinfer.QUANTIZED_MATMULS)
    args = p.parse_args()
    models = {}
    for path in args.gguf:
        model = jaxinfer.load_model(path)
        if args.quantized_matmul:
            model = dataclasses.replace(model, quantized_matmul=args.quantized_matmul)
        models[path] = model
    print(f"{'file':32s} {'round':>5s} | {'ours tg':>8s} {'llama tg':>8s} {'ratio':>5s} | {'ours pp':>8s} "
          f"{'llama pp':>8s} {'ratio':>5s} | load (ours, llama)")
    for r in range(args.rounds):
        for path, model in models.items():
            load_ours = os.getloadavg()[0]
            a = ours(model, args.decode_tokens, args.prompt_len, args.reps)
            load_llama = os.getloadavg()[0]
            b = llama_bench(args.llama_run, path, args.threads, args.reps, args.decode_tokens, args.prompt_len)
            print(f"{Path(path).name:32s} {r:5d} | {a['decode']:8.1f} {b['decode']:8.1f} {a['decode'] / b['decode']:5.2f} "
                  f"| {a['prefill']:8.1f} {b['prefill']:8.1f} {a['prefill'] / b['prefill']:5.2f} | "
                  f"{load_ours:.2f}, {load_llama:.2f}", flush=True)


if __name__ == "__main__":
    main()
