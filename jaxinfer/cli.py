"""The `jaxinfer` command: parse, call, print. (Streaming, chat, convert, info arrive with issue 3.)"""

from __future__ import annotations

import argparse
import sys
import time

import jaxinfer


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be integers separated by spaces or commas")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate from one prompt")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF checkpoint directory (config.json + *.safetensors)")
    source.add_argument("--preset", help="random weights for a preset in configs/ (e.g. smollm2-135m)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer.json beside the weights)")
    prompt.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids, e.g. '1,2,3'")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    return parser


def _generate(args) -> int:
    t0 = time.perf_counter()
    model = jaxinfer.load_model(args.model, args.dtype) if args.model else jaxinfer.random_model(args.preset, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    sampling = jaxinfer.SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    t0 = time.perf_counter()
    (out,) = jaxinfer.generate(model, [prompt], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    gen_s = time.perf_counter() - t0
    print(out.text if out.text is not None else " ".join(map(str, out.tokens)))
    print(
        f"[{len(out.tokens)} tokens in {gen_s:.2f} s (compile included), {len(out.tokens) / gen_s:.1f} tok/s; "
        f"load {load_s:.2f} s; finish_reason={out.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _generate(args)
    except ValueError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
