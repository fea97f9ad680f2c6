"""Time to first token and peak memory of one long prompt on a real checkpoint (default: the embedded model).

    python scripts/long_prompt.py --prompt-len 4000 6000 --dtype float32

Each length runs in a process of its own (peak RSS is per process): load, then `generate(..., max_new_tokens=1)`
twice. "cold" includes compiling the prefill programs (the persistent compilation cache is off in the child),
"warm" is the second call, the steady state. The prompt is token ids cycling through the vocabulary: prefill
time does not depend on which ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; getrusage's ru_maxrss would carry over its parent's across exec)."""
    with open("/proc/self/status") as f:
        kib = int(f.read().split("VmHWM:")[1].split()[0])
    return kib / 2**20


def child(args) -> None:
    import jax

    import jaxinfer
    from jaxinfer.generate import DEFAULT_PREFILL_CHUNK

    model = jaxinfer.load_model(args.model, dtype=args.dtype) if args.model else jaxinfer.load_model(dtype=args.dtype)
    n = args.prompt_len[0]
    prompt = [[3 + (7 * i) % (model.cfg.vocab_size - 3) for i in range(n)]]
    chunk = args.prefill_chunk or DEFAULT_PREFILL_CHUNK
    rss_loaded = _peak_rss_gib()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        jaxinfer.generate(model, prompt, max_new_tokens=1, prefill_chunk=chunk)
        times.append(time.perf_counter() - t0)
    peak = _peak_rss_gib()
    print(json.dumps(dict(prompt_len=n, prefill_chunk=chunk, dtype=model.cfg.dtype, cold_s=times[0],
                          warm_s=times[1], peak_rss_gib=peak, rss_after_load_gib=rss_loaded, jax=jax.__version__)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[4000, 6000])
    p.add_argument("--prefill-chunk", type=int, default=None, help="default: generate's DEFAULT_PREFILL_CHUNK")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    env = dict(os.environ, JAXINFER_COMPILATION_CACHE="off")
    for n in args.prompt_len:
        cmd = [sys.executable, __file__, "--child", "--dtype", args.dtype, "--prompt-len", str(n)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--prefill-chunk", str(args.prefill_chunk)] if args.prefill_chunk else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"prompt {n}: the child failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"prompt {r['prompt_len']} tokens ({r['dtype']}, chunks of {r['prefill_chunk']}, jax {r['jax']}): "
              f"TTFT cold {r['cold_s']:.1f} s, warm {r['warm_s']:.1f} s; peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"({r['rss_after_load_gib']:.2f} GiB after loading)", flush=True)


if __name__ == "__main__":
    main()
