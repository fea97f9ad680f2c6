"""How far a quantized model's predictions move from a reference's, measured the way llama.cpp's llama-perplexity does.

    python scripts/eval_accuracy.py --model default --quantize int8 --text jaxinfer/data/botchan.txt --ctx 512
    python scripts/eval_accuracy.py --model q4_k_m.gguf --reference f32.gguf --reference-logits f32.npy --json o.json

The text is tokenized whole (with BOS where the model's tokenizer adds one, as llama-perplexity's
`common_tokenize(ctx, text, true)` does), then cut into floor(n / ctx) non-overlapping windows of --ctx tokens; the
tail is dropped. Each window is scored on its own from an empty cache, its first token replaced by BOS when the
tokenizer adds one (llama-perplexity puts BOS at the head of every chunk the same way). Only the second half counts:
in each window the logits at positions first = ctx // 2 .. ctx - 2 predict tokens first + 1 .. ctx - 1, so
ctx - 1 - ctx // 2 tokens per window (255 of 512), as `perplexity()` and `kl_divergence()` in llama.cpp's
tools/perplexity/perplexity.cpp count them.

Printed, over those positions (the reference's logits come from the same windows of the same tokens):
- PPL = exp(mean NLL) of the model, and of the reference beside it;
- mean KL divergence KL(reference || model), from both log-softmaxes in float64, and its 99th percentile (linear
  interpolation between sorted values, as llama.cpp's `percentile`);
- same top-1: the share of positions where both models' highest logit is the same token ("Same top p");
- max and RMS |dlogit| over every (position, vocabulary) entry: the raw logits' difference, model - reference;
- the bytes the model's weights are held in (every leaf of params, a QuantArray's codes and scales together).
Where this differs from llama.cpp: llama-perplexity keeps the base model's log-probs in 16 bits over [max - 16, max]
and drops terms with base log-prob <= -16 from the KL sum; here both log-softmaxes are exact float64. llama-perplexity
refuses a text shorter than two windows; here one window is enough.

The reference defaults to the model's own file held in float32 (--reference-quantize none), the f32 model that
llama.cpp's KL divergence is measured against. --reference-logits FILE.npy keeps the reference's logits at the scored
positions (float32, windows x (ctx - 1 - ctx // 2) x vocab: 1 GB for SmolLM2 over the shipped text at ctx 512) so
that later runs over the same tokens read them instead of running the reference again, as llama-perplexity's
--kl-divergence-base file does (there 16-bit log-probs).

Errors in the arguments (a missing file, an unknown --quantize, a text shorter than one window) are one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np

import jaxinfer  # its public names load on first use: the argument checks below run before jax is imported

DEFAULT_TEXT = Path(jaxinfer.__file__).parent / "data" / "botchan.txt"  # shipped in the wheel (pyproject.toml)
PERCENTILE = 99.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(message: str):
    """One line on stderr and exit status 2, as a usage error."""
    print(f"eval_accuracy: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help='a .gguf file, a checkpoint directory, or "default"')
    p.add_argument("--quantize", default="auto", help="how the model's weights are held (load_model's quantize=)")
    p.add_argument("--kv-cache-dtype", default=None, help="the model's KV cache dtype, where load_model takes one")
    p.add_argument("--quantized-matmul", default=None,
                   help="how the model contracts quantized weights (Model.quantized_matmul: xla, kernel, kernel-float, kernel-int8; "
                        "default: the platform's)")
    p.add_argument("--reference", default=None, help="the reference model (default: --model)")
    p.add_argument("--reference-quantize", default="none", help="how the reference's weights are held")
    p.add_argument("--reference-quantized-matmul", default="xla",
                   help="how the reference contracts quantized weights (default xla, XLA's dequantize-and-dot): with "
                        "--reference-quantize auto, the same weights through another matmul isolate the kernel's error")
    p.add_argument("--reference-logits", default=None,
                   help="FILE.npy: the reference's logits at the scored positions; written on the first run (as "
                        "llama-perplexity's --kl-divergence-base), read instead of running the reference afterwards")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="a UTF-8 text file (default: the shipped Botchan)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (llama-perplexity's -c)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def check_args(args, quantize_choices) -> None:
    """Every check that needs no weights, before any is read."""
    for flag in ("quantize", "reference_quantize"):
        if getattr(args, flag) not in quantize_choices:
            name = "--" + flag.replace("_", "-")
            fail(f"{name} {getattr(args, flag)!r} is not one of {', '.join(quantize_choices)}")
    matmuls = getattr(jaxinfer, "QUANTIZED_MATMULS", ())
    for flag in ("quantized_matmul", "reference_quantized_matmul"):
        value = getattr(args, flag)
        if value is not None and matmuls and value not in matmuls:
            fail(f"--{flag.replace('_', '-')} {value!r} is not one of {', '.join(matmuls)}")
    for flag, path in (("--model", args.model), ("--reference", args.reference), ("--text", args.text)):
        if path is not None and path != "default" and not Path(path).exists():
            fail(f"{flag} {path!r}: no such file or directory")
    if args.ctx < 4:
        fail(f"--ctx {args.ctx} must be at least 4 (half of each window is context, half is scored)")


def _has_quantized_matmul() -> bool:
    """Whether this jaxinfer's Model takes quantized_matmul (the script also measures older checkouts)."""
    return "quantized_matmul" in {f.name for f in dataclasses.fields(jaxinfer.Model)}


def load(path: str, quantize: str, kv_cache_dtype: str | None, quantized_matmul: str | None = None):
    kwargs = {"quantize": quantize}
    if kv_cache_dtype is not None:
        kwargs["kv_cache_dtype"] = kv_cache_dtype
    try:
        model = jaxinfer.load_model(path, **kwargs)
        if quantized_matmul is not None:
            model = dataclasses.replace(model, quantized_matmul=quantized_matmul)
        return model
    except ValueError as e:  # a bad file or setting, named by the loader
        fail(f"{path}: {e}")


def token_ids(tokenizer, text: str) -> tuple[list[int], bool]:
    """(the text's ids, whether the tokenizer puts BOS first): encode with special tokens, as llama.cpp does."""
    ids = tokenizer.encode(text)
    plain = tokenizer.encode(text, add_special_tokens=False)
    add_bos = tokenizer.bos_token_id is not None and len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id
    if len(ids) > len(plain) + int(add_bos):
        fail("the tokenizer appends EOS to a text (llama-perplexity refuses such a vocabulary)")
    return ids, add_bos


def windows(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: floor(n / ctx) of ctx tokens each, each headed by BOS when bos is given."""
    out = []
    for start in range(0, len(ids) // ctx * ctx, ctx):
        window = list(ids[start : start + ctx])
        if bos is not None:
            window[0] = bos
        out.append(window)
    return out


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Tally:
    """Sums over the scored positions of every window."""

    def __init__(self):
        self.nll, self.nll_ref, self.kld, self.same_top = [], [], [], []
        self.max_dlogit, self.sum_dlogit2, self.num_logits = 0.0, 0.0, 0

    def add(self, logits: np.ndarray, logits_ref: np.ndarray, targets: np.ndarray) -> None:
        """logits, logits_ref: [S, V] float32 at the scored positions; targets: [S] the tokens they predict."""
        lp, lp_ref = log_softmax64(logits), log_softmax64(logits_ref)
        rows = np.arange(len(targets))
        self.nll.append(-lp[rows, targets])
        self.nll_ref.append(-lp_ref[rows, targets])
        self.kld.append((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1))
        self.same_top.append(logits.argmax(axis=-1) == logits_ref.argmax(axis=-1))
        d = logits.astype(np.float64) - logits_ref.astype(np.float64)
        self.max_dlogit = max(self.max_dlogit, float(np.abs(d).max()))
        self.sum_dlogit2 += float((d * d).sum())
        self.num_logits += d.size

    def results(self) -> dict:
        nll, nll_ref, kld = (np.concatenate(x) for x in (self.nll, self.nll_ref, self.kld))
        return {
            "positions": int(nll.size),
            "ppl": float(np.exp(nll.mean())),
            "ppl_reference": float(np.exp(nll_ref.mean())),
            "kld_mean": float(kld.mean()),
            f"kld_p{PERCENTILE:g}": float(np.percentile(kld, PERCENTILE)),
            "same_top1": float(np.concatenate(self.same_top).mean()),
            "dlogit_max": self.max_dlogit,
            "dlogit_rms": float(np.sqrt(self.sum_dlogit2 / self.num_logits)),
        }


class ReferenceLogits:
    """The reference's float32 logits at the scored positions, [windows, S, V] in a .npy file beside a .json naming
    what they were computed from (written last: a file without it is an unfinished run and is written anew)."""

    def __init__(self, path: str, key: dict, shape: tuple[int, int, int]):
        self.path, self.meta_path, self.key = Path(path), Path(path + ".json"), key
        self.saved = None
        if self.meta_path.is_file():
            meta = json.loads(self.meta_path.read_text())
            differ = [name for name in key if meta.get(name) != key[name]]
            if differ:
                parts = ["other tokens" if name == "tokens_sha256" else f"{name} {meta.get(name)!r} (this run: "
                         f"{key[name]!r})" for name in differ]
                fail(f"--reference-logits {path!r} was written for {'; '.join(parts)}")
            self.saved = np.load(self.path, mmap_mode="r")
            if self.saved.shape != shape:
                fail(f"--reference-logits {path!r} holds {self.saved.shape}, this run needs {shape}")
            self.held_bytes = meta["reference_held_bytes"]
        else:
            self.writing = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)

    def finish(self, held_bytes: int) -> None:
        if self.saved is None:
            self.writing.flush()
            self.meta_path.write_text(json.dumps({**self.key, "reference_held_bytes": held_bytes}, indent=2) + "\n")


def held_bytes(model) -> int:
    """Bytes of every weight as held: a QuantArray's codes, scales and mins; a float array's own."""
    import jax

    from jaxinfer import quant

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(model.params, is_leaf=quant.is_quant)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args, jaxinfer.QUANTIZE_CHOICES)
    if args.kv_cache_dtype is not None and "kv_cache_dtype" not in inspect.signature(jaxinfer.load_model).parameters:
        fail("--kv-cache-dtype: this jaxinfer's load_model has no kv_cache_dtype")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--text {args.text!r}: {e}")

    reference_path = args.reference or args.model
    if args.quantized_matmul is not None and not _has_quantized_matmul():
        fail("--quantized-matmul: this jaxinfer's Model has no quantized_matmul")
    model = load(args.model, args.quantize, args.kv_cache_dtype, args.quantized_matmul)
    if model.tokenizer is None:
        fail(f"--model {args.model!r} has no tokenizer to encode the text with")
    ids, add_bos = token_ids(model.tokenizer, text)
    if len(ids) < args.ctx:
        fail(f"--text {args.text!r} is {len(ids)} tokens, shorter than one window of --ctx {args.ctx}")
    if args.ctx > model.cfg.max_position_embeddings:
        fail(f"--ctx {args.ctx} exceeds the model's context of {model.cfg.max_position_embeddings} tokens")
    chunks = windows(ids, args.ctx, model.tokenizer.bos_token_id if add_bos else None)
    first = args.ctx // 2
    saved = None
    if args.reference_logits:
        key = {"reference": reference_path if reference_path == "default" else str(Path(reference_path).resolve()),
               "reference_quantize": args.reference_quantize,
               "reference_quantized_matmul": args.reference_quantized_matmul, "ctx": args.ctx,
               "tokens_sha256": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()}
        saved = ReferenceLogits(args.reference_logits, key, (len(chunks), args.ctx - 1 - first, model.cfg.vocab_size))
    reference = None
    if saved is None or saved.saved is None:
        matmul = args.reference_quantized_matmul if _has_quantized_matmul() else None
        reference = load(reference_path, args.reference_quantize, None, matmul)
        if reference.cfg.vocab_size != model.cfg.vocab_size:
            fail(f"--reference has a vocabulary of {reference.cfg.vocab_size}, the model {model.cfg.vocab_size}")
    print(f"{len(ids)} tokens (BOS {'added' if add_bos else 'not added'}), {len(chunks)} windows of {args.ctx}, "
          f"{args.ctx - 1 - first} scored per window")
    tally = Tally()
    t0 = time.perf_counter()
    for i, window in enumerate(chunks):
        start = i * args.ctx
        logits = jaxinfer.score(model, window)[first : args.ctx - 1]  # [S, V]
        if reference is None:
            logits_ref = np.asarray(saved.saved[i])
        else:
            logits_ref = jaxinfer.score(reference, window)[first : args.ctx - 1]  # [S, V]
            if saved is not None:
                saved.writing[i] = logits_ref
        tally.add(logits, logits_ref, np.asarray(ids[start + first + 1 : start + args.ctx]))
        if i == 0:
            print(f"first window: {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - t0
    reference_bytes = saved.held_bytes if reference is None else held_bytes(reference)
    if saved is not None:
        saved.finish(reference_bytes)

    results = {
        "model": args.model, "quantize": args.quantize, "kv_cache_dtype": args.kv_cache_dtype,
        "quantized_matmul": args.quantized_matmul,
        "reference": reference_path, "reference_quantize": args.reference_quantize,
        "reference_quantized_matmul": args.reference_quantized_matmul, "text": args.text,
        "ctx": args.ctx, "tokens": len(ids), "add_bos": add_bos, "windows": len(chunks),
        **tally.results(), "held_bytes": held_bytes(model),
        "reference_held_bytes": reference_bytes, "seconds": seconds,
    }
    r = results
    print(f"PPL {r['ppl']:.4f} (reference {r['ppl_reference']:.4f}) over {r['positions']} positions")
    print(f"mean KLD {r['kld_mean']:.6f}, {PERCENTILE:g}% KLD {r[f'kld_p{PERCENTILE:g}']:.6f}")
    print(f"same top-1 {100 * r['same_top1']:.2f}%")
    print(f"|dlogit| max {r['dlogit_max']:.4f}, RMS {r['dlogit_rms']:.4f}")
    print(f"weights held in {r['held_bytes']:,} bytes ({r['held_bytes'] / 2**20:.1f} MiB; reference "
          f"{r['reference_held_bytes'] / 2**20:.1f} MiB); {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
