"""Attention kernels side by side: ours (pallas_kernels/) against XLA, cuDNN and JAX's reference Pallas kernels.

    python scripts/bench_kernels.py --gpu h100 --json profiles/bench_kernels.json     # the issue-4 shapes
    python scripts/bench_kernels.py --sweep --only decode                              # batch x context x page
    python scripts/bench_kernels.py --interpret --tiny                                 # CPU smoke test

Prefill is causal self-attention over a prompt whose K/V sit in the paged cache (FLOPs = 4*B*N*H*S*S/2, the
causal half); decode is one query per sequence over `context` cached tokens (bytes = the K/V each sequence
actually attends to, plus q and o). Every implementation gets the same random data: contiguous K/V [B, S, K, H]
for the dense peers, the same K/V scattered into pages under a permuted page table for the paged ones. Layout
changes a peer needs (kv heads repeated for JAX's mha, q pre-scaled for the kernels that take no softmax
scale) happen once, outside the timed region.

Before any timing, each output is compared with the float32 `attention_reference`; a row that disagrees is
marked MISMATCH (and the script exits 1), never silently timed. A peer that does not run here (no GPU, an
unsupported shape or dtype, an exception) is one line "skipped: <reason>" and the run goes on.

Times are medians over `--iters` samples after `--warmup` calls; each sample is `calls` back-to-back dispatches
(enough for ~2 ms) divided by `calls`, so dispatch overlaps the device work. Kernels shorter than the host's
dispatch time (~10-20 us) are dispatch-bound for every implementation alike. With `--interpret` Pallas kernels,
ours and JAX's, run through the Pallas interpreter: a correctness smoke test, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import roofline
from jaxinfer.timing import median_seconds
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import attention_reference

TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}  # |o - ref| <= tol * (1 + |ref|)
_MASKED = -1e30
_REFERENCE_CHUNK_ELEMS = 2**28  # float32 scores per reference chunk (1 GiB): long prompts are checked in pieces
_SAMPLE_SECONDS = 2e-3


@dataclasses.dataclass(frozen=True)
class Shape:
    op: str  # "prefill" | "decode"
    batch: int
    seq: int  # prefill: prompt length (queries = keys); decode: cached context per sequence (keys)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    @property
    def label(self) -> str:
        length = "S" if self.op == "prefill" else "context"
        return (f"{self.op} B={self.batch} {length}={self.seq} N={self.num_heads} K={self.num_kv_heads} "
                f"H={self.head_dim} page={self.page_size}")

    @property
    def pages_per_seq(self) -> int:
        return -(-self.seq // self.page_size)


ISSUE_SHAPES = [
    Shape("prefill", 1, 4096, 32, 32, 128, 16),
    Shape("prefill", 1, 4096, 32, 8, 128, 16),  # GQA
    Shape("decode", 32, 2048, 32, 8, 128, 16),
]
TINY_SHAPES = [  # context 40 ends inside a page; N/K = 4 and 2
    Shape("prefill", 1, 128, 4, 4, 64, 16),
    Shape("prefill", 1, 128, 8, 2, 64, 16),
    Shape("decode", 2, 40, 8, 2, 64, 16),
]


def sweep_shapes(max_tokens: int) -> tuple[list[Shape], list[Shape]]:
    """(shapes, left out): prefill over S, GQA and page size; decode over batch, context and page size."""
    prefill = [Shape("prefill", 1, s, 32, k, 128, p)
               for s, k, p in itertools.product((1024, 2048, 4096, 8192), (32, 8), (16, 64))]
    decode = [Shape("decode", b, c, 32, 8, 128, p)
              for b, c, p in itertools.product((1, 8, 32, 128), (512, 2048, 8192, 32768), (16, 64))]
    kept = [s for s in prefill + decode if s.batch * s.seq <= max_tokens]
    return kept, [s for s in prefill + decode if s.batch * s.seq > max_tokens]


# ---------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Problem:
    shape: Shape
    q: jax.Array  # prefill [B, T, N, H]; decode [B, N, H]
    k: jax.Array  # [B, S, K, H] contiguous
    v: jax.Array  # [B, S, K, H]
    k_pages: jax.Array  # [K, P, page_size, H], P = B * pages_per_seq
    v_pages: jax.Array  # [K, P, page_size, H]
    page_table: jax.Array  # [B, pages_per_seq] int32, a random permutation of the pages
    q_positions: jax.Array  # prefill [B, T]; decode [B] int32
    kv_lengths: jax.Array  # [B] int32


def to_pages(x, page_table, page_size: int):
    """Contiguous x [B, S, K, H] -> pages [K, P, page_size, H] with sequence b's block j at page_table[b, j]."""
    B, S, K, H = x.shape
    pages_per_seq = page_table.shape[1]
    x = jnp.pad(x, ((0, 0), (0, pages_per_seq * page_size - S), (0, 0), (0, 0)))  # [B, pps * page_size, K, H]
    x = x.reshape(B, pages_per_seq, page_size, K, H).transpose(3, 0, 1, 2, 4)  # [K, B, pps, page_size, H]
    x = x.reshape(K, B * pages_per_seq, page_size, H)  # [K, P, page_size, H], page b * pps + j
    return jnp.zeros_like(x).at[:, page_table.reshape(-1)].set(x)


def make_problem(shape: Shape, dtype, seed: int = 0) -> Problem:
    B, S, N, K, H = shape.batch, shape.seq, shape.num_heads, shape.num_kv_heads, shape.head_dim
    kq, kk, kv, kp = jax.random.split(jax.random.key(seed), 4)
    q_shape = (B, S, N, H) if shape.op == "prefill" else (B, N, H)
    q = jax.random.normal(kq, q_shape, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    page_table = jax.random.permutation(kp, B * shape.pages_per_seq).astype(jnp.int32).reshape(B, -1)
    kv_lengths = jnp.full((B,), S, jnp.int32)
    if shape.op == "prefill":
        q_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    else:
        q_positions = kv_lengths - 1  # the new token's K/V is already in the cache, as the model writes it
    return Problem(shape, q, k, v, to_pages(k, page_table, shape.page_size), to_pages(v, page_table, shape.page_size),
                   page_table, q_positions, kv_lengths)


def work(shape: Shape, itemsize: int) -> float:
    """Prefill: causal FLOPs. Decode: HBM bytes of the K/V attended to plus q and o."""
    B, S, N, K, H = shape.batch, shape.seq, shape.num_heads, shape.num_kv_heads, shape.head_dim
    if shape.op == "prefill":
        return 4 * B * N * H * S * S / 2
    return (2 * B * S * K * H + 2 * B * N * H) * itemsize


# ---------------------------------------------------------------------------------------------
# The float32 reference and the check.


def reference_output(p: Problem) -> np.ndarray:
    """attention_reference in float32 (q upcast, so it returns float32), prefill checked in query chunks."""
    ref = jax.jit(attention_reference)
    q32 = p.q.astype(jnp.float32)
    if p.shape.op == "decode":
        o = ref(q32[:, None], p.k_pages, p.v_pages, p.page_table, p.q_positions[:, None], p.kv_lengths)
        return np.asarray(o[:, 0])  # [B, N, H]
    B, T, N, _ = p.q.shape
    chunk = max(1, min(T, _REFERENCE_CHUNK_ELEMS // (B * N * T)))
    chunk = math.gcd(T, 2 ** (chunk.bit_length() - 1))  # one compiled chunk shape that divides T
    pieces = [ref(q32[:, t:t + chunk], p.k_pages, p.v_pages, p.page_table, p.q_positions[:, t:t + chunk],
                  p.kv_lengths) for t in range(0, T, chunk)]
    return np.concatenate([np.asarray(x) for x in pieces], axis=1)  # [B, T, N, H]


def max_error(out, ref: np.ndarray, tol: float) -> tuple[float, bool]:
    """(max |out - ref|, whether every element is within tol * (1 + |ref|)); NaN anywhere fails."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    if out.shape != ref.shape:
        return math.inf, False
    err = np.abs(out - ref)
    ok = bool(np.all(err <= tol * (1 + np.abs(ref))))  # False for NaN
    return float(np.nanmax(err)) if np.isfinite(err).all() else math.inf, ok


# ---------------------------------------------------------------------------------------------
# Implementations. Each setup does its layout changes and returns a Run; raising Skipped (or anything else)
# reports the row as skipped.


class Skipped(Exception):
    """A peer that does not apply on this platform or shape."""


def _identity(o):
    return o


@dataclasses.dataclass(frozen=True)
class Run:
    thunk: Callable[[], jax.Array]  # the timed call, inputs already in the implementation's layout
    post: Callable = _identity  # its output -> ours: prefill [B, T, N, H], decode [B, N, H] (untimed)
    note: str = ""  # printed after the row: what this implementation was given that the others were not


@dataclasses.dataclass(frozen=True)
class Impl:
    key: str
    name: str
    setup: Callable[[Problem, bool], Run]  # (problem, interpret) -> Run


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _ours(p: Problem, interpret: bool):
    kernel = flash_attention if p.shape.op == "prefill" else paged_attention
    args = (p.q, p.k_pages, p.v_pages, p.page_table, p.q_positions, p.kv_lengths)
    return Run(lambda: kernel(*args, interpret=interpret))  # on a GPU: the Mosaic body where it applies


def _ours_triton(p: Problem, interpret: bool):
    """Our generic (Triton) body, next to the default pick above (the Mosaic GPU body on a GPU)."""
    kernel = flash_attention if p.shape.op == "prefill" else paged_attention
    args = (p.q, p.k_pages, p.v_pages, p.page_table, p.q_positions, p.kv_lengths)
    return Run(lambda: kernel(*args, implementation="triton", interpret=interpret))


@jax.jit
def _reference_jit(q, k_pages, v_pages, page_table, q_positions, kv_lengths):
    return attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lengths)


def _xla_reference(p: Problem, interpret: bool):
    """What the model runs on the 'reference' backend: gather the pages, attend in float32."""
    if p.shape.op == "prefill":
        args = (p.q, p.k_pages, p.v_pages, p.page_table, p.q_positions, p.kv_lengths)
        return Run(lambda: _reference_jit(*args))
    args = (p.q[:, None], p.k_pages, p.v_pages, p.page_table, p.q_positions[:, None], p.kv_lengths)
    return Run(lambda: _reference_jit(*args), lambda o: o[:, 0])


@jax.jit
def dense_attention(q, k, v, q_positions, kv_lengths):
    """q [B, T, N, H] over contiguous k/v [B, S, K, H] -> [B, T, N, H]: plain jnp, matmuls in the input dtype
    accumulating in float32 (as XLA runs them on tensor cores), softmax in float32."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    precision = "highest" if q.dtype == jnp.float32 else None
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32, precision=precision) * H**-0.5
    key = jnp.arange(S)
    visible = (key[None, None, :] <= q_positions[:, :, None]) & (key[None, None, :] < kv_lengths[:, None, None])
    s = jnp.where(visible[:, None, None], s, _MASKED)  # [B, K, G, T, S]
    probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32, precision=precision)
    return o.reshape(B, T, N, H).astype(q.dtype)  # [B, T, K, G, H] -> [B, T, N, H]


def _xla_dense(p: Problem, interpret: bool):
    if p.shape.op == "prefill":
        args = (p.q, p.k, p.v, p.q_positions, p.kv_lengths)
        return Run(lambda: dense_attention(*args))
    args = (p.q[:, None], p.k, p.v, p.q_positions[:, None], p.kv_lengths)
    return Run(lambda: dense_attention(*args), lambda o: o[:, 0])


def _cudnn(p: Problem, interpret: bool):
    if not _on_gpu():
        raise Skipped(f"cuDNN needs a CUDA GPU (backend {jax.default_backend()})")
    if p.shape.op == "prefill":
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        return Run(lambda: fn(p.q, p.k, p.v))
    # One query that sees every cached key: no causal mask, the lengths bound the keys.
    fn = jax.jit(lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"))
    q = p.q[:, None]  # [B, 1, N, H]
    return Run(lambda: fn(q, p.k, p.v, p.kv_lengths), lambda o: o[:, 0])


def _prescaled_q(p: Problem):
    """q * H**-0.5 for the kernels that apply no softmax scale themselves (rounded once to the input dtype)."""
    return (p.q.astype(jnp.float32) * p.shape.head_dim**-0.5).astype(p.q.dtype)


def _triton_gate(interpret: bool):
    if not (_on_gpu() or interpret):
        raise Skipped(f"JAX's Pallas Triton kernels need a GPU or --interpret (backend {jax.default_backend()})")


def _jax_triton(p: Problem, interpret: bool):
    _triton_gate(interpret)
    if p.shape.op == "prefill":
        from jax.experimental.pallas.ops.gpu.attention import mha

        # mha wants as many kv heads as q heads: repeat them once here (it then reads G times the K/V bytes).
        G = p.shape.num_heads // p.shape.num_kv_heads
        k, v = jnp.repeat(p.k, G, axis=2), jnp.repeat(p.v, G, axis=2)  # [B, S, N, H]
        fn = jax.jit(lambda q, k, v: mha(q, k, v, None, sm_scale=p.shape.head_dim**-0.5, causal=True,
                                         interpret=interpret))
        return Run(lambda: fn(p.q, k, v), note=f"kv heads repeated {G}x" if G > 1 else "")
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged_attention

    k_pages, v_pages = to_jax_paged_layout(p.k_pages), to_jax_paged_layout(p.v_pages)
    pages_per_seq = p.page_table.shape[1]
    k_splits = math.gcd(pages_per_seq, 16)  # its defaults (16 splits, 8 pages a step), cut to divide the table
    pages_per_block = math.gcd(pages_per_seq // k_splits, 8)
    fn = jax.jit(lambda q, k, v, table, lengths: jax_paged_attention(
        q, k, v, table, lengths, k_splits=k_splits, pages_per_compute_block=pages_per_block, interpret=interpret))
    q = _prescaled_q(p)
    return Run(lambda: fn(q, k_pages, v_pages, p.page_table, p.kv_lengths),
               note=f"k_splits={k_splits} pages_per_compute_block={pages_per_block}")


def to_jax_paged_layout(pages):
    """Ours [K, P, page_size, H] -> jax.experimental.pallas.ops.gpu.paged_attention's [num_kv_heads,
    total_num_pages, page_size, head_dim]: the same layout in jax 0.10 and 0.11 (the correctness check catches
    a change), so only the shape is asserted."""
    assert pages.ndim == 4, pages.shape
    return pages


def _mgpu_attention(attention_mgpu, config):
    return jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, config))


def _jax_mgpu(p: Problem, interpret: bool):
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Skipped(f"attention_mgpu not importable: {type(e).__name__}: {e}") from None
    if p.shape.op != "prefill":
        raise Skipped("attention_mgpu is a prefill (self-attention) kernel")
    if not _on_gpu():
        raise Skipped(f"Mosaic GPU needs a Hopper GPU (backend {jax.default_backend()})")
    q = _prescaled_q(p)
    dtypes = [p.q.dtype] + ([jnp.dtype(jnp.float16)] if p.q.dtype == jnp.bfloat16 else [])
    errors = []
    for dtype, block_kv in itertools.product(dtypes, (256, 128, 64)):  # as its own main(): first that compiles
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
        args = (q.astype(dtype), p.k.astype(dtype), p.v.astype(dtype))
        fn = _mgpu_attention(attention_mgpu, config)
        try:
            jax.block_until_ready(fn(*args))
        except Exception as e:  # noqa: BLE001 - too much shared memory, unsupported dtype: try the next
            errors.append(f"{jnp.dtype(dtype).name} block_kv={block_kv}: {type(e).__name__}: {_first_line(e)}")
            continue
        return Run(lambda: fn(*args), note=f"{jnp.dtype(dtype).name} block_kv={block_kv}")
    raise Skipped("; ".join(errors[-2:]))


IMPLS = [
    Impl("ours", "ours: pallas_kernels", _ours),
    Impl("ours-triton", "ours: generic body (Triton)", _ours_triton),
    Impl("xla-reference", "XLA attention_reference (gather)", _xla_reference),
    Impl("xla-dense", "XLA dense jnp (contiguous)", _xla_dense),
    Impl("cudnn", "cuDNN dot_product_attention", _cudnn),
    Impl("jax-triton", "JAX Pallas (Triton) reference", _jax_triton),
    Impl("jax-mgpu", "JAX attention_mgpu (Mosaic GPU)", _jax_mgpu),
]


# ---------------------------------------------------------------------------------------------
# Timing and the run.


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else "(no message)"
    return line[:limit] + ("..." if len(line) > limit else "")


def default_gpu_name(device_kind: str) -> str | None:
    """The roofline table's entry for a jax device_kind ('NVIDIA H100 80GB HBM3' -> 'h100'), None if unknown."""
    kind = device_kind.lower()
    known = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100-sxm4-40gb", "a100-40gb"),
             ("a100", "a100-80gb"), ("nvidia l4", "l4"), ("nvidia a10", "a10"))
    for needle, name in known:
        if needle in kind:
            return name
    return None


def bench_shape(shape: Shape, args, gpu) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    tol = TOL[dtype.name]
    amount = work(shape, dtype.itemsize)
    print(f"{shape.label} {dtype.name}")
    base = dict(dataclasses.asdict(shape), dtype=dtype.name, label=shape.label)
    problem = make_problem(shape, dtype)
    try:
        ref = reference_output(problem)
    except Exception as e:  # noqa: BLE001 - nothing can be checked, so nothing is timed
        print(f"  reference failed, shape not timed: {type(e).__name__}: {_first_line(e)}")
        return [dict(base, impl="reference", status="failed", reason=f"{type(e).__name__}: {_first_line(e)}")]
    rows = []
    ours_seconds = None
    for impl in IMPLS:
        if args.impls and impl.key not in args.impls:
            continue
        row = dict(base, impl=impl.key, name=impl.name)
        head = f"  {impl.name:<34}"
        try:
            run = impl.setup(problem, args.interpret)
            out = jax.block_until_ready(run.thunk())
        except Exception as e:  # noqa: BLE001 - a peer that raises is reported and the run goes on
            reason = str(e) if isinstance(e, Skipped) else f"{type(e).__name__}: {_first_line(e)}"
            status = "failed" if impl.key == "ours" else "skipped"
            print(f"{head} {'FAILED' if status == 'failed' else 'skipped'}: {reason}")
            rows.append(dict(row, status=status, reason=reason))
            continue
        err, ok = max_error(run.post(out), ref, tol)
        seconds = median_seconds(run.thunk, args.warmup, args.iters, _SAMPLE_SECONDS)
        rate = amount / seconds
        row.update(status="ok" if ok else "MISMATCH", seconds=seconds, ms=1e3 * seconds, max_err=err, tol=tol)
        if shape.op == "prefill":
            row["tflops"] = rate / 1e12
            line = f"{head} {1e3 * seconds:9.3f} ms {rate / 1e12:8.1f} TFLOP/s"
            peak, peak_name = (gpu.peak_flops, "peak") if gpu else (None, "")
        else:
            row["tbps"] = rate / 1e12
            line = f"{head} {1e3 * seconds:9.3f} ms {rate / 1e12:8.3f} TB/s"
            peak, peak_name = (gpu.hbm_bytes_per_s, "HBM") if gpu else (None, "")
        if peak:
            row["roofline_fraction"] = rate / peak
            line += f" ({100 * rate / peak:4.1f}% of {gpu.name} {peak_name})"
        if impl.key == "ours" and ok:
            ours_seconds = seconds
        if ours_seconds is not None and impl.key != "ours":
            row["ours_over_peer"] = seconds / ours_seconds  # > 1: ours is faster
            line += f"  ours/peer {seconds / ours_seconds:5.2f}x"
        line += f"  err {err:.1e}" + (f"  ({run.note})" if run.note else "")
        row["note"] = run.note
        if not ok:
            line += f"  MISMATCH: max |o - ref| {err:.3g} > tol {tol} * (1 + |ref|)"
        print(line)
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="prefill S 1k..8k, decode batch 1..128 x context 512..32k, "
                   "pages 16 and 64, instead of the issue's shapes")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (with --interpret: the CPU smoke test)")
    p.add_argument("--only", choices=("prefill", "decode"), default=None)
    p.add_argument("--impls", nargs="+", default=None, choices=[i.key for i in IMPLS], help="run only these")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOL))
    p.add_argument("--interpret", action="store_true", help="run Pallas kernels in interpret mode (CPU)")
    p.add_argument("--gpu", default=None, help=f"roofline peaks, one of {sorted(roofline.GPUS)}; default from the "
                   "device kind")
    p.add_argument("--hbm-tbps", type=float, default=None, help="replace the table's HBM bandwidth (measured: 3.05)")
    p.add_argument("--max-tokens", type=int, default=2**20, help="sweep: leave out shapes with B * S above this")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device_kind = jax.devices()[0].device_kind
    gpu_name = args.gpu or default_gpu_name(device_kind)
    gpu = roofline.gpu(gpu_name) if gpu_name else None
    if gpu and args.hbm_tbps:
        gpu = gpu.replace(hbm_bytes_per_s=args.hbm_tbps * 1e12)
    if args.tiny:
        shapes, left_out = TINY_SHAPES, []
    elif args.sweep:
        shapes, left_out = sweep_shapes(args.max_tokens)
    else:
        shapes, left_out = ISSUE_SHAPES, []
    shapes = [s for s in shapes if args.only in (None, s.op)]
    peaks = ""
    if gpu:
        peaks = f", roofline {gpu.name}: {gpu.peak_flops / 1e12:.0f} TFLOP/s, {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s"
    print(f"jax {jax.__version__} on {device_kind} ({jax.default_backend()}), {args.dtype}"
          f"{', interpret mode' if args.interpret else ''}{peaks}")
    for s in left_out:
        if args.only in (None, s.op):
            print(f"{s.label}: skipped: B * S = {s.batch * s.seq} > --max-tokens {args.max_tokens}")

    rows = []
    for shape in shapes:
        rows += bench_shape(shape, args, gpu)
    bad = [r for r in rows if r["status"] in ("MISMATCH", "failed")]
    for r in bad:
        why = r.get("reason") or f"max err {r['max_err']:.3g} > tol {r['tol']}"
        print(f"!!! {r['status']}: {r.get('name', r['impl'])} at {r['label']}: {why}")
    results = dict(
        jax=jax.__version__, device=device_kind, backend=jax.default_backend(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        dtype=args.dtype, interpret=args.interpret, gpu=dataclasses.asdict(gpu) if gpu else None,
        ok=not bad, rows=rows,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
