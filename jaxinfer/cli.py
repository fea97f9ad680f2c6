"""The `jaxinfer` command: parse, call, print.

    jaxinfer generate [--model M] --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] ...
    jaxinfer chat [--model M]
    jaxinfer convert SRC DST [--dtype bfloat16]
    jaxinfer info [--model M]
    jaxinfer roofline [--model M] [--gpu h100]

--model is "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, a HF directory, an orbax directory
written by `convert`, or preset:<name> for random weights of a preset in configs/.
"""

from __future__ import annotations

import argparse
import sys
import time

import jaxinfer
from jaxinfer import roofline


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be integers separated by spaces or commas") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default="default", help="default | FILE.gguf | HF dir | orbax dir | preset:NAME")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 for GGUF")
        p.add_argument("--tensor-parallel", type=int, default=1, help="split the model over this many devices")

    def sampling_args(p):
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--min-p", type=float, default=0.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)

    g = sub.add_parser("generate", help="stream a completion of one prompt")
    model_args(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. '1,2,3'")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    sampling_args(g)

    c = sub.add_parser("chat", help="an interactive conversation (Ctrl-C stops a reply, Ctrl-D quits)")
    model_args(c)
    c.add_argument("--system", default=None)
    sampling_args(c)

    v = sub.add_parser("convert", help="convert a checkpoint to orbax (+ config and tokenizer)")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])

    i = sub.add_parser("info", help="architecture, parameters, bytes, KV bytes per token, context")
    model_args(i)

    r = sub.add_parser("roofline", help="the inference math of a model on a GPU")
    model_args(r)
    r.add_argument("--gpu", default="h100", help=f"one of {sorted(roofline.GPUS)}")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--context", type=int, default=1024)
    return parser


def _sampling(args) -> jaxinfer.SamplingParams:
    return jaxinfer.SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )


def _load(args, progress: bool = True) -> jaxinfer.Model:
    t0 = time.perf_counter()
    if args.model.startswith("preset:"):
        model = jaxinfer.random_model(
            args.model.removeprefix("preset:"), dtype=args.dtype, tensor_parallel=args.tensor_parallel
        )
    else:
        model = jaxinfer.load_model(args.model, args.dtype, args.tensor_parallel, progress=progress)
    print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return model


def _config(args) -> jaxinfer.ModelConfig:
    """The model's config; a preset needs no weights (random llama-2-7b weights would take 13 GB)."""
    if args.model.startswith("preset:"):
        cfg = jaxinfer.ModelConfig.preset(args.model.removeprefix("preset:"))
        return cfg if args.dtype is None else cfg.replace(dtype=args.dtype)
    return _load(args).cfg


def _stream(model, prompt_ids: list[int], args) -> tuple[list[int], str | None]:
    """Print the reply as it is produced; returns its tokens and finish reason (None if interrupted)."""
    decoder = model.tokenizer.stream() if model.tokenizer is not None else None
    tokens, finish = [], None
    t0 = time.perf_counter()
    t_first = None
    stream = jaxinfer.generate_stream(
        model, [prompt_ids], max_new_tokens=args.max_new_tokens, sampling=_sampling(args), seed=args.seed
    )
    try:
        for chunk in stream:
            new = chunk.new_tokens[0]
            if new and t_first is None:
                t_first = time.perf_counter() - t0
            tokens += new
            text = "".join(map(decoder.feed, new)) if decoder is not None else "".join(f"{t} " for t in new)
            print(text, end="", flush=True)
            finish = chunk.finish_reasons[0]
    except KeyboardInterrupt:
        stream.close()
        finish = "interrupted"
    total = time.perf_counter() - t0
    print(decoder.flush() if decoder is not None else "", flush=True)
    if tokens:
        decode_s = max(total - (t_first or 0.0), 1e-9)
        print(
            f"[{len(tokens)} tokens, TTFT {1e3 * (t_first or total):.0f} ms, {(len(tokens) - 1) / decode_s:.1f} tok/s "
            f"after the first, stop reason: {finish}]",
            file=sys.stderr,
        )
    return tokens, finish


def _prompt_ids(model, text: str, chat: bool, system: str | None) -> list[int]:
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass --prompt-ids")
    if not chat:
        return model.tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return model.tokenizer.encode(model.tokenizer.apply_chat_template(messages), add_special_tokens=False)


def cmd_generate(args) -> int:
    model = _load(args)
    ids = args.prompt_ids if args.prompt is None else _prompt_ids(model, args.prompt, args.chat, args.system)
    _stream(model, ids, args)
    return 0


def cmd_chat(args) -> int:
    model = _load(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise ValueError(f"model {args.model!r} has no chat template")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("[chat: Ctrl-C stops a reply, Ctrl-D or /exit quits]", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user.strip() == "/exit":
            return 0
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        text = model.tokenizer.apply_chat_template(messages)
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        tokens, _ = _stream(model, ids, args)
        messages.append({"role": "assistant", "content": model.tokenizer.decode(tokens)})


def cmd_convert(args) -> int:
    from jaxinfer.convert import convert

    t0 = time.perf_counter()
    dst = convert(args.src, args.dst, dtype=args.dtype, progress=True)
    print(f"[converted {args.src} -> {dst} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    cfg = _config(args)
    n = roofline.param_count(cfg)
    print(f"architecture     {cfg.architecture} ({cfg.num_layers} layers, d_model {cfg.d_model}, ffn {cfg.ffn_dim})")
    print(f"attention        {cfg.num_heads} q heads, {cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}"
          + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""))
    print(f"vocabulary       {cfg.vocab_size}" + (" (tied embeddings)" if cfg.tie_embeddings else ""))
    print(f"parameters       {n:,} ({n / 1e9:.3f} B)")
    print(f"weight bytes     {roofline.weight_bytes(cfg) / 1e9:.3f} GB as {cfg.dtype}")
    kv = roofline.kv_bytes_per_token(cfg, bytes_per_elem=cfg.jnp_dtype.itemsize)
    print(f"KV bytes/token   {kv / 1024:.1f} KiB ({cfg.dtype})")
    print(f"max context      {cfg.max_position_embeddings} tokens")
    return 0


def cmd_roofline(args) -> int:
    cfg = _config(args)
    if args.dtype is None:  # GPU serving runs bfloat16, whatever the checkpoint's storage dtype
        cfg = cfg.replace(dtype="bfloat16")
    gpu = roofline.gpu(args.gpu)
    b, c = args.batch, args.context
    step_bytes = roofline.decode_step_bytes(cfg, b, c)
    flops = roofline.decode_flops(cfg, b, c)
    floor = roofline.decode_floor_seconds(cfg, gpu, b, c)
    print(f"{args.model} as {cfg.dtype} on {gpu.name}: "
          f"{gpu.peak_flops / 1e12:.0f} TFLOP/s, {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, ops:byte {roofline.ops_per_byte(gpu):.1f}")
    print(f"decode batch {b} context {c}: {flops / b / 1e9:.2f} GFLOP and {step_bytes / b / 1e9:.3f} GB per token")
    print(f"decode floor     {1e3 * floor:.3f} ms/step ({b / floor:.0f} tok/s)")
    print(f"arithmetic intensity {roofline.decode_arithmetic_intensity(cfg, b, c):.1f} FLOP/byte")
    print(f"compute-bound from batch {roofline.critical_batch_size(cfg, gpu, c):.0f} (context {c})")
    print(f"KV capacity      {roofline.kv_capacity_tokens(cfg, gpu.memory_bytes):,} tokens beside the weights")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "info": cmd_info,
            "roofline": cmd_roofline}


def _enable_compilation_cache() -> None:
    """Reuse compiled programs across runs (TTFT of a fresh process is mostly compilation); JAX_COMPILATION_CACHE_DIR
    overrides the place, and an empty value turns it off."""
    import os

    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jaxinfer/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        return COMMANDS[args.command](args)
    except ValueError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
