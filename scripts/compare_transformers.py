"""jaxinfer vs transformers on the same CPU, model and prompt, measured side by side in one run.

    python scripts/compare_transformers.py --max-new-tokens 64 --repeats 3

Both run the default SmolLM2-135M-Instruct GGUF dequantized to float32, greedy, with EOS ignored so both
produce exactly --max-new-tokens tokens. Runs alternate between the two (after one warm-up each) and the
medians are printed: load time, time to first token, decode tokens/s and end-to-end tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import jaxinfer
from jaxinfer.checkpoints.gguf_file import default_gguf_path


def time_jaxinfer(model, ids, n):
    """-> (TTFT seconds, total seconds) for n greedy tokens through the streaming path the CLI uses."""
    t0 = time.perf_counter()
    first = None
    greedy = jaxinfer.SamplingParams(temperature=0.0)
    for chunk in jaxinfer.generate_stream(model, [ids], max_new_tokens=n, sampling=greedy):
        if first is None:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def time_generate(model, ids, n):
    t0 = time.perf_counter()
    jaxinfer.generate(model, [ids], max_new_tokens=n, sampling=jaxinfer.SamplingParams(temperature=0.0))
    return time.perf_counter() - t0


def time_transformers(hf, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        hf(x)  # prefill alone: time to first token
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return first, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Write a short story about a robot learning to paint.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import transformers

    gguf = default_gguf_path()
    t0 = time.perf_counter()
    ours = jaxinfer.load_model("default", dtype="float32")
    ours = jaxinfer.Model(ours.cfg.replace(eos_token_ids=()), ours.params, ours.tokenizer)  # always n tokens
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf.eval()
    load_hf = time.perf_counter() - t0

    chat = [{"role": "user", "content": args.prompt}]
    ids = ours.tokenizer.encode(ours.tokenizer.apply_chat_template(chat), add_special_tokens=False)
    n = args.max_new_tokens
    time_jaxinfer(ours, ids, n), time_generate(ours, ids, n), time_transformers(hf, ids, n)  # warm-up, compile
    stream, loop, theirs = [], [], []
    for _ in range(args.repeats):
        stream.append(time_jaxinfer(ours, ids, n))
        loop.append(time_generate(ours, ids, n))
        theirs.append(time_transformers(hf, ids, n))
    ttft_ours, total_stream = (statistics.median(x) for x in zip(*stream))
    total_loop = statistics.median(loop)
    ttft_hf, total_hf = (statistics.median(x) for x in zip(*theirs))
    print(f"prompt {len(ids)} tokens, {n} new tokens, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"jax {jaxinfer.model.jax.__version__} on {jaxinfer.model.jax.devices()[0].device_kind}")
    print(f"load          jaxinfer {load_ours:.2f} s   transformers {load_hf:.2f} s")
    print(f"TTFT          jaxinfer {1e3 * ttft_ours:.0f} ms   transformers {1e3 * ttft_hf:.0f} ms (prefill forward)")
    print(f"tokens/s      jaxinfer generate {n / total_loop:.1f}   jaxinfer stream {n / total_stream:.1f}   "
          f"transformers generate {n / total_hf:.1f}")


if __name__ == "__main__":
    main()
