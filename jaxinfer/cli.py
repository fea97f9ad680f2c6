"""The `jaxinfer` command: parse, check, call, print.

    jaxinfer generate [--model M] (--prompt TEXT | --prompt-ids IDS | --prompt-file FILE) [--chat] [--json] ...
    jaxinfer chat [--model M]
    jaxinfer convert SRC DST [--dtype bfloat16] [--overwrite]
    jaxinfer info [--model M]
    jaxinfer roofline [--model M] [--gpu h100]

--model is "default" (the embedded SmolLM2-135M-Instruct), a .gguf file, a HF directory, an orbax directory
written by `convert`, or preset:<name> for random weights of a preset in configs/.

Every argument is checked before jax is imported or a weight is read; errors are one line naming the flag.
Exit status: 0 ok, 1 runtime error (I/O, memory, device), 2 bad usage or input (a flag, a file, a prompt),
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import jaxinfer
from jaxinfer import interrupts, prompt_spec, roofline
from jaxinfer.chat_history import ChatHistory
from jaxinfer.errors import ParameterError
from jaxinfer.prompt_spec import Defaults, PromptError, PromptSpec
from jaxinfer.quant_modes import KV_CACHE_DTYPES, QUANTIZE_CHOICES, QUANTIZED_MATMULS
from jaxinfer.sampling_params import INT32_MAX, SEED_LIMIT, SamplingParams
from jaxinfer.server import DEFAULT_MAX_WAITING

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad argument, worded for the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"jaxinfer: error: {message} (see `{self.prog} --help`)\n")


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} must be in [{low}, {high}]")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 and finite")
    return value


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be integers separated by spaces or commas") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be one or more token ids >= 0")
    return ids


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxinfer", description="JAX/XLA LLM inference",
        epilog="exit status: 0 ok, 1 runtime error, 2 bad usage or input, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"jaxinfer {jaxinfer.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("--model", default="default", help="default | FILE.gguf | HF dir | orbax dir | preset:NAME")
        p.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's (float32 for GGUF)")
        p.add_argument("--tensor-parallel", type=_int_in(1, 4096), default=1, help="split over this many devices")
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                       help="how the weights are held: auto keeps a quantized GGUF's blocks and floats float; none "
                            "dequantizes all; int8 (per 32), int8-channel, int4[-g64|-g128], fp8 quantize every "
                            "projection at load")

    def run_args(p):
        p.add_argument("--quantized-matmul", choices=QUANTIZED_MATMULS, default=None,
                       help="how quantized weights meet their activations: xla (dequantize and dot), kernel (the "
                            "native CPU matmul, activations rounded to 16 bits per 32), kernel-float (float "
                            "activations), kernel-int8 (8 bits per 32, as llama.cpp does); default: kernel on the "
                            "CPU where it built, else xla")

    def kv_cache_args(p):
        p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                       help="store the KV cache as int8 (a scale per token and kv head) or fp8 (e4m3, a scale per "
                            "layer): about a quarter of float32's bytes; default: the model's dtype")

    def sampling_args(p):
        p.add_argument("--max-new-tokens", type=_int_in(1, INT32_MAX), default=256)
        p.add_argument("--context", type=_int_in(2, INT32_MAX), help="cap the context below the model's (tokens)")
        p.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, reproducible")
        p.add_argument("--top-k", type=_int_in(0, INT32_MAX), default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--min-p", type=float, default=0.0)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=_int_in(0, SEED_LIMIT - 1), default=0)

    g = sub.add_parser("generate", help="complete one prompt (streamed) or a file of prompts")
    model_args(g)
    run_args(g)
    kv_cache_args(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. '1,2,3'")
    prompt.add_argument("--prompt-file", help="one prompt per line, or JSON lines (.jsonl) with per-line fields; - is stdin")
    g.add_argument("--jsonl", action=argparse.BooleanOptionalAction, default=None,
                   help="read --prompt-file as JSON lines (default: by its suffix, .jsonl or .ndjson)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")
    g.add_argument("--batch-size", type=_int_in(1, 1024), default=8, help="prompts run at once (--prompt-file): the engine's slots")
    sampling_args(g)

    c = sub.add_parser("chat", help="an interactive conversation (Ctrl-C stops a reply, Ctrl-D quits)")
    model_args(c)
    run_args(c)
    kv_cache_args(c)
    c.add_argument("--system", default=None)
    sampling_args(c)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs: pip install -e '.[serve]')")
    model_args(s)
    run_args(s)
    kv_cache_args(s)
    s.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    s.add_argument("--port", type=_int_in(0, 65535), default=8000)
    s.add_argument("--served-model-name", default=None, help="the API's model name (default: --model)")
    s.add_argument("--max-slots", type=_int_in(1, 4096), default=16, help="requests decoding at once")
    s.add_argument("--max-tokens-per-step", type=_int_in(1, INT32_MAX), default=512)
    s.add_argument("--context", type=_int_in(2, INT32_MAX), help="cap the context below the model's (tokens)")
    s.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/* and /tokenize (default: $JAXINFER_API_KEY; none)")
    s.add_argument("--max-waiting", type=_int_in(0, INT32_MAX), default=DEFAULT_MAX_WAITING,
                   help="requests queued beyond --max-slots before new ones get 429")
    s.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM: seconds the requests in flight may run on (new ones get 503), then exit 0")

    v = sub.add_parser("convert", help="convert a checkpoint to orbax (+ config and tokenizer)")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--dtype", choices=DTYPES)
    v.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                   help="store the weights as load_model(quantize=) holds them (auto: a quantized GGUF's blocks)")
    v.add_argument("--overwrite", action="store_true", help="replace DST if it is a jaxinfer orbax checkpoint")

    i = sub.add_parser("info", help="architecture, parameters, bytes, KV bytes per token, context")
    model_args(i)

    r = sub.add_parser("roofline", help="the inference math of a model on a GPU")
    model_args(r)
    r.add_argument("--gpu", default="h100", choices=sorted(roofline.GPUS))
    r.add_argument("--batch", type=_int_in(1, INT32_MAX), default=1)
    r.add_argument("--context", type=_int_in(0, INT32_MAX), default=1024)
    return parser


# ---------------------------------------------------------------------------------------------
# Checks that need no model


def _flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def _defaults(args) -> Defaults:
    """The flags every prompt starts from; a bad sampling flag fails here, before anything is loaded."""
    sampling = {name: getattr(args, name) for name in prompt_spec.SAMPLING_FIELDS}
    try:
        SamplingParams(**sampling)
    except ParameterError as e:
        raise UsageError(f"{_flag(e.param)} {e.value} {e.reason}") from None
    for name in ("prompt", "system"):
        text = getattr(args, name, None)
        if text is not None:
            prompt_spec.check_text(text, _flag(name))
    return Defaults(getattr(args, "chat", True), args.system, args.max_new_tokens, args.seed, sampling)


def _specs(args) -> list[PromptSpec]:
    defaults = _defaults(args)
    if args.prompt_file is not None:
        return prompt_spec.read_prompt_file(args.prompt_file, args.jsonl, defaults, stdin=sys.stdin)
    if args.prompt is not None:
        return [prompt_spec.make_spec("--prompt", {"prompt": args.prompt}, defaults)]
    return [prompt_spec.make_spec("--prompt-ids", {"prompt_ids": args.prompt_ids}, defaults)]


def _field(spec: PromptSpec, name: str) -> str:
    """How to name a prompt's field: the flag for the command line's own prompt, else the file line's field."""
    return _flag(name) if spec.where.startswith("--") else f"{spec.where}: '{name}'"


def _open(args) -> tuple[jaxinfer.Checkpoint | None, jaxinfer.ModelConfig]:
    """(checkpoint, its config) from the metadata alone (config.json, the GGUF header, a preset's JSON): no weight
    is read. The checkpoint (None for a preset) keeps what it parsed for the load."""
    if args.model.startswith("preset:"):
        cfg = jaxinfer.ModelConfig.preset(args.model.removeprefix("preset:"))
        return None, cfg if args.dtype is None else cfg.replace(dtype=args.dtype)
    checkpoint = jaxinfer.open_checkpoint(args.model)
    return checkpoint, checkpoint.config(args.dtype)


def _context(args, cfg) -> int:
    if args.context is None:
        return cfg.max_position_embeddings
    if args.context > cfg.max_position_embeddings:
        raise UsageError(f"--context {args.context} is beyond the model's context of {cfg.max_position_embeddings}")
    return args.context


def _check_against_config(specs: list[PromptSpec], cfg, context: int) -> None:
    for spec in specs:
        if spec.max_new_tokens >= context:
            raise UsageError(
                f"{_field(spec, 'max_new_tokens')} {spec.max_new_tokens} leaves no room for the prompt in the "
                f"context of {context} tokens"
            )
        if spec.sampling.top_k > cfg.vocab_size:
            raise UsageError(
                f"{_field(spec, 'top_k')} {spec.sampling.top_k} is larger than the vocabulary ({cfg.vocab_size}); "
                "0 turns top-k off"
            )
        bad = [t for t in spec.ids or () if t >= cfg.vocab_size]
        if bad:
            raise UsageError(f"{spec.where}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")


def _warn_16bit_on_cpu(args) -> None:
    import jax

    if args.dtype in ("bfloat16", "float16") and jax.default_backend() == "cpu":
        print(f"jaxinfer: warning: --dtype {args.dtype} runs slower than float32 on the CPU (~1.3x for the default "
              "model's decode, profiles/README.md); --dtype float32 is the fast choice here", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Loading and running


def _load(args, checkpoint, cfg, context: int) -> jaxinfer.Model:
    _warn_16bit_on_cpu(args)
    t0 = time.perf_counter()
    if checkpoint is None:
        model = jaxinfer.random_model(cfg, tensor_parallel=args.tensor_parallel, quantize=args.quantize)
    else:
        model = checkpoint.load(args.dtype, args.tensor_parallel, progress=True, quantize=args.quantize)
    # generate, chat and serve have both
    model = dataclasses.replace(model, kv_cache_dtype=args.kv_cache_dtype, quantized_matmul=args.quantized_matmul)
    if context < model.cfg.max_position_embeddings:
        model.cfg = model.cfg.replace(max_position_embeddings=context)
    print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return model


def _prompt_ids(model, spec: PromptSpec) -> list[int]:
    if spec.ids is not None:
        ids = list(spec.ids)
    elif model.tokenizer is None:
        raise UsageError(f"{spec.where}: this model has no tokenizer; give token ids (--prompt-ids)")
    elif spec.chat:
        messages = ([{"role": "system", "content": spec.system}] if spec.system else [])
        ids = model.tokenizer.encode_chat(messages + [{"role": "user", "content": spec.text}])
    else:
        ids = model.tokenizer.encode(spec.text)
    context = model.cfg.max_position_embeddings
    if len(ids) + spec.max_new_tokens > context:
        raise UsageError(
            f"{spec.where} is {len(ids)} tokens; with {_field(spec, 'max_new_tokens')} {spec.max_new_tokens} it "
            f"passes the context of {context} tokens"
        )
    return ids


@dataclasses.dataclass
class _Row:
    """One prompt's completion as it streams in."""

    spec: PromptSpec
    prompt_ids: list[int]
    has_text: bool  # False: the model has no tokenizer, ids are printed as numbers
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    printed: int = 0  # pieces of text already written to stdout
    finish: str | None = None
    t_first: float | None = None
    t_done: float | None = None

    def feed(self, new: list[int], text: str | None, now: float) -> None:
        if new and self.t_first is None:
            self.t_first = now
        self.tokens += new
        self.text.append(text if self.has_text else "".join(f"{t} " for t in new))

    def end(self, finish: str, now: float) -> None:
        self.finish, self.t_done = finish, now

    def summary(self, t0: float) -> dict:
        ttft = (self.t_first or self.t_done) - t0
        decode_s = self.t_done - (self.t_first or self.t_done)
        rate = (len(self.tokens) - 1) / decode_s if len(self.tokens) > 1 and decode_s > 0 else None
        out = {} if self.spec.id is None else {"id": self.spec.id}
        return {
            **out, "text": "".join(self.text), "token_ids": self.tokens, "finish_reason": self.finish,
            "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
            "ttft_s": round(ttft, 4), "tokens_per_s": None if rate is None else round(rate, 2),
        }


class _Printer:
    """Writes completions in prompt order as they arrive: the first unfinished row streams live, later rows wait."""

    def __init__(self, as_json: bool, label_rows: bool):
        self.as_json, self.label_rows = as_json, label_rows

    def show(self, rows: list[_Row], cursor: int, t0: float) -> int:
        while cursor < len(rows):
            row = rows[cursor]
            if not self.as_json and row.printed < len(row.text):
                print("".join(row.text[row.printed:]), end="", flush=True)
                row.printed = len(row.text)
            if row.finish is None:
                break
            summary = row.summary(t0)
            if self.as_json:
                print(json.dumps(summary, ensure_ascii=False), flush=True)
            else:
                print(flush=True)
                rate = "" if summary["tokens_per_s"] is None else f", {summary['tokens_per_s']:.1f} tok/s after the first"
                label = f"{row.spec.where}: " if self.label_rows else ""
                print(f"[{label}{len(row.tokens)} tokens, TTFT {1e3 * summary['ttft_s']:.0f} ms{rate}, "
                      f"stop reason: {row.finish}]", file=sys.stderr)
            cursor += 1
        return cursor


def _pages_for(specs: list[PromptSpec], prompts: list[list[int]], max_slots: int, context: int) -> int:
    """A KV pool that holds what these prompts need, every slot at once (the page 0 null page included), not the
    engine's default of 2,048 tokens a slot and a whole context: one short prompt's pool is a few pages, not the
    377 MB of the default model's float32 default (its peak RSS 1.35 -> 0.9 GB)."""
    from jaxinfer.generate import DEFAULT_PAGE_SIZE as page  # the engine's default page size
    need = max(-(-min(len(ids) + spec.max_new_tokens, context) // page) for spec, ids in zip(specs, prompts))
    return 1 + max_slots * need


def _engine(model, prompt_lengths: list[int], max_slots: int, num_pages: int | None = None):
    """The CLI's engine, with the programs these prompts meet compiled (or read from the persistent compilation
    cache) before the first token, so TTFT and tokens/s are the model's, not a compile's; other shapes (a chat's
    later turns) compile on first use."""
    engine = jaxinfer.Engine(model, max_slots=max_slots, num_pages=num_pages, warm_up=False)
    print(f"[compiled in {engine.warm_up(prompt_lengths):.1f} s]", file=sys.stderr)
    return engine


def _run(engine, specs: list[PromptSpec], prompts: list[list[int]], printer: _Printer, watch) -> tuple[list[_Row], bool]:
    """Run prompts through the engine, printing as tokens come; -> (rows, interrupted). Ctrl-C (see
    jaxinfer.interrupts) stops it after the step in flight: the unfinished rows are aborted and end as
    "interrupted", printed like the others."""
    has_text = engine.tokenizer is not None
    rows = {}
    t0 = time.perf_counter()
    for spec, ids in zip(specs, prompts):
        rid = engine.add_request(ids, sampling=spec.sampling, max_new_tokens=spec.max_new_tokens, seed=spec.seed)
        rows[rid] = _Row(spec, ids, has_text)
    ordered = list(rows.values())
    cursor = 0
    with watch.stoppable() as stop:
        while cursor < len(ordered) and not stop.is_set():
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                row = rows.get(out.request_id)
                if row is not None and row.finish is None:
                    row.feed(out.new_token_ids, out.text, now)
                    if out.finish_reason is not None:
                        row.end(out.finish_reason, now)
            cursor = printer.show(ordered, cursor, t0)
        interrupted = stop.is_set() and cursor < len(ordered)
    if interrupted:
        now = time.perf_counter()
        for rid, row in rows.items():
            if row.finish is None:
                engine.abort(rid)
                row.end("interrupted", now)
        engine.step()  # hands out the aborts, so the next turn starts clean
    printer.show(ordered, cursor, t0)
    return ordered, interrupted


def cmd_generate(args) -> int:
    specs = _specs(args)
    checkpoint, cfg = _open(args)
    context = _context(args, cfg)
    _check_against_config(specs, cfg, context)
    model = _load(args, checkpoint, cfg, context)
    prompts = [_prompt_ids(model, spec) for spec in specs]
    printer = _Printer(args.json, label_rows=len(specs) > 1)
    max_slots = min(args.batch_size, len(specs))
    engine = _engine(model, [len(ids) for ids in prompts], max_slots, _pages_for(specs, prompts, max_slots, context))
    try:
        _, interrupted = _run(engine, specs, prompts, printer, args.interrupts)
    finally:
        engine.close()
    if interrupted:
        print("jaxinfer: interrupted", file=sys.stderr)
        return interrupts.EXIT_INTERRUPTED
    return EXIT_OK


def _read_line(prompt: str) -> str | None:
    """A line from stdin (None at its end); undecodable bytes arrive as surrogates (see _utf8_stdin)."""
    try:
        return input(prompt)
    except EOFError:
        print(file=sys.stderr)
        return None


def _utf8_stdin() -> None:
    """Read stdin with surrogateescape, so a line of bad bytes is reported and skipped, not a crash that loses the
    lines after it."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def cmd_chat(args) -> int:
    defaults = _defaults(args)
    checkpoint, cfg = _open(args)
    context = _context(args, cfg)
    # The flags' own spec, for the checks of --max-new-tokens and --top-k against the model.
    _check_against_config([prompt_spec.make_spec("--prompt", {"prompt": "-"}, defaults)], cfg, context)
    model = _load(args, checkpoint, cfg, context)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise UsageError(f"--model {args.model} has no chat template")
    history = ChatHistory(args.system)
    # One engine for the session: turn N finds the history's pages in its prefix cache, so its first token waits
    # for the new tokens, not for the whole conversation again. One slot; the pool holds one whole context.
    engine = _engine(model, [], max_slots=1, num_pages=1 + -(-context // 16))
    try:
        return _chat_loop(engine, history, defaults, context, args.interrupts)
    finally:
        engine.close()


def _chat_loop(engine, history: ChatHistory, defaults: Defaults, context: int, watch) -> int:
    _utf8_stdin()
    print("[chat: Ctrl-C stops a reply, /reset forgets the history, Ctrl-D or /exit quits]", file=sys.stderr)
    while True:
        line = _read_line("> ")
        if line is None or line.strip() in ("/exit", "/quit"):
            return EXIT_OK
        if line.strip() == "/reset":
            history.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            _chat_turn(engine, history, line, defaults, context, watch)
        except (ValueError, RuntimeError, MemoryError) as e:  # this turn failed; the conversation goes on
            _report(e)


def _chat_turn(engine, history: ChatHistory, line: str, defaults: Defaults, context: int, watch) -> None:
    prompt_spec.check_text(line, "this line")
    fitted = history.fit(line, engine.tokenizer.encode_chat, context, defaults.max_new_tokens)
    if fitted.turns_dropped:
        print(f"[dropped the {fitted.turns_dropped} oldest turn(s) to stay within the context of {context} tokens]",
              file=sys.stderr)
    if fitted.reply_tokens < defaults.max_new_tokens:
        print(f"[the context leaves room for a reply of {fitted.reply_tokens} tokens]", file=sys.stderr)
    spec = prompt_spec.make_spec("this turn", {"prompt": line, "max_new_tokens": fitted.reply_tokens}, defaults)
    (row,), _ = _run(engine, [spec], [fitted.ids], _Printer(as_json=False, label_rows=False), watch)
    history.add_turn(line, "".join(row.text))  # a reply stopped by Ctrl-C stays, as far as it went


def cmd_serve(args) -> int:
    try:
        from jaxinfer.server import serve
        from jaxinfer.server.app import create_app
    except ImportError as e:
        raise UsageError(f"jaxinfer serve needs the serve extra ({e.name} is missing): "
                         "python3 -m pip install -e '.[serve]'") from None
    _check_can_listen(args.host, args.port)  # before a model is loaded and compiled for nothing
    checkpoint, cfg = _open(args)
    model = _load(args, checkpoint, cfg, _context(args, cfg))
    t0 = time.perf_counter()
    engine = jaxinfer.AsyncEngine(model, max_slots=args.max_slots, max_tokens_per_step=args.max_tokens_per_step)
    print(f"[compiled in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    try:
        app = create_app(engine, args.served_model_name or args.model, api_key=args.api_key,
                         max_waiting=args.max_waiting)
        serve.run(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    finally:
        engine.close()
    return EXIT_OK


def _check_can_listen(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as uvicorn binds
            pass
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_convert(args) -> int:
    from jaxinfer.convert import convert

    if Path(args.dst).exists() and not args.overwrite:
        raise UsageError(f"DST {args.dst} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    with args.interrupts.catchable():  # an interrupted write removes its temporary files on the way out
        dst = convert(args.src, args.dst, dtype=args.dtype, progress=True, overwrite=args.overwrite,
                      quantize=args.quantize)
    print(f"[converted {args.src} -> {dst} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return EXIT_OK


def _held_bytes(args, checkpoint, cfg) -> int:
    """Bytes the weights are held in under --quantize (and --dtype), from the metadata alone."""
    if checkpoint is None:
        from jaxinfer import model as model_lib
        from jaxinfer import quant

        return quant.held_bytes(model_lib.abstract_params(cfg, args.quantize))
    return checkpoint.held_bytes(args.dtype, args.quantize)


def _held_as(args, held: int, cfg) -> str:
    bits = 8 * held / roofline.param_count(cfg)
    return f"--quantize {args.quantize}, {bits:.2f} bits per weight"


def cmd_info(args) -> int:
    checkpoint, cfg = _open(args)
    n = roofline.param_count(cfg)
    print(f"architecture     {cfg.architecture} ({cfg.num_layers} layers, d_model {cfg.d_model}, ffn {cfg.ffn_dim})")
    print(f"attention        {cfg.num_heads} q heads, {cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}"
          + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else ""))
    print(f"vocabulary       {cfg.vocab_size}" + (" (tied embeddings)" if cfg.tie_embeddings else ""))
    print(f"parameters       {n:,} ({n / 1e9:.3f} B)")
    held = _held_bytes(args, checkpoint, cfg)
    print(f"weight bytes     {held / 1e9:.3f} GB as held ({_held_as(args, held, cfg)}; "
          f"{roofline.weight_bytes(cfg) / 1e9:.3f} GB as {cfg.dtype})")
    kv = roofline.kv_bytes_per_token(cfg, bytes_per_elem=cfg.jnp_dtype.itemsize)
    print(f"KV bytes/token   {kv / 1024:.1f} KiB ({cfg.dtype})")
    print(f"max context      {cfg.max_position_embeddings} tokens")
    return EXIT_OK


def cmd_roofline(args) -> int:
    checkpoint, cfg = _open(args)
    if args.dtype is None:  # GPU serving runs bfloat16, whatever the checkpoint's storage dtype
        cfg = cfg.replace(dtype="bfloat16")
        args.dtype = "bfloat16"
    gpu = roofline.gpu(args.gpu)
    b, c = args.batch, args.context
    held = _held_bytes(args, checkpoint, cfg)
    per_param = held / roofline.param_count(cfg)  # bytes per weight as held (--quantize)
    step_bytes = roofline.decode_step_bytes(cfg, b, c, per_param)
    flops = roofline.decode_flops(cfg, b, c)
    floor = roofline.decode_floor_seconds(cfg, gpu, b, c, weight_bytes_per_param=per_param)
    ratio = roofline.ops_per_byte(gpu)
    print(f"{args.model} as {cfg.dtype}, weights {held / 1e9:.3f} GB ({_held_as(args, held, cfg)}) on {gpu.name}: "
          f"{gpu.peak_flops / 1e12:.0f} TFLOP/s, {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, ops:byte {ratio:.1f}")
    print(f"decode batch {b} context {c}: {flops / b / 1e9:.2f} GFLOP and {step_bytes / b / 1e9:.3f} GB per token")
    print(f"decode floor     {1e3 * floor:.3f} ms/step ({b / floor:.0f} tok/s)")
    intensity = roofline.decode_arithmetic_intensity(cfg, b, c, weight_bytes_per_param=per_param)
    print(f"arithmetic intensity {intensity:.1f} FLOP/byte")
    critical = roofline.critical_batch_size(cfg, gpu, c, weight_bytes_per_param=per_param)
    if critical == float("inf"):
        print(f"never compute-bound at context {c}: each sequence's KV reads grow with the batch as fast as its "
              f"FLOPs, and attention does fewer than {ratio:.0f} FLOPs per KV byte")
    else:
        print(f"compute-bound from batch {critical:.0f} (context {c})")
    capacity = roofline.kv_capacity_tokens(cfg, gpu.memory_bytes, weight_bytes_per_param=per_param)
    print(f"KV capacity      {capacity:,} tokens beside the weights")
    return EXIT_OK


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "convert": cmd_convert, "info": cmd_info,
            "roofline": cmd_roofline}


# ---------------------------------------------------------------------------------------------
# Errors and exit codes


def _report(e: BaseException, kind: str = "error") -> None:
    if isinstance(e, OSError) and e.strerror:
        message = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        message = str(e) or type(e).__name__
    print(f"jaxinfer: {kind}: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """The reader of our stdout is gone (`| head`): point fd 1 at /dev/null so the interpreter's final flush
    does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a real file (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    """argv None: the real command line (also installs the Ctrl-C watcher); a list: in-process, as tests call it."""
    watch = interrupts.install() if argv is None else interrupts.PythonDefault()
    try:
        args = _parser().parse_args(argv)
        args.interrupts = watch
        return COMMANDS[args.command](args)
    except SystemExit as e:  # argparse: --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C in a catchable() block, or anywhere in-process (interrupts.PythonDefault)
        print("\njaxinfer: interrupted", file=sys.stderr)
        return interrupts.EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except (UsageError, PromptError, ValueError) as e:
        _report(e)
        return EXIT_USAGE
    except (OSError, RuntimeError, MemoryError, ImportError) as e:
        _report(e)
        return EXIT_RUNTIME
    except Exception as e:  # a bug in jaxinfer: say so in one line; the traceback on request
        if os.environ.get("JAXINFER_TRACEBACK"):
            raise
        _report(e, f"internal error ({type(e).__name__}; JAXINFER_TRACEBACK=1 shows where)")
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
