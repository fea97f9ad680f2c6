"""The inference math of LLM serving: parameters, FLOPs, bytes, KV size, ops:byte, MBU and MFU.

Pure Python over ModelConfig (no jax), so scripts and tests can size a model on any machine.

Conventions:
- A matmul of an [M, D] activation by a [D, F] weight is 2 * M * D * F FLOPs (one multiply, one add).
- Bytes are what crosses HBM: a decode step reads every weight once and, for each sequence, its
  cached K and V; it writes the new token's K and V. Activations are ignored (small at decode).
- `context_len` is the number of tokens already in a sequence's KV cache before the step; the new
  token(s) sit at positions context_len, context_len + 1, ...
- GB and TB are decimal (1e9, 1e12), as HBM bandwidths are quoted; MiB and GiB are binary.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxinfer.config import ModelConfig

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------------
# Input checks for the public functions.


def _int_at_least(name: str, value, low: int) -> int:
    try:
        index = None if isinstance(value, bool) else operator.index(value)  # numpy ints pass, floats don't
    except TypeError:
        index = None
    if index is None or index < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return index


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return value


def _bytes_per_param(cfg: ModelConfig, bytes_per_param) -> float:
    if bytes_per_param is None:
        return _DTYPE_BYTES[cfg.dtype]
    return _positive("bytes_per_param", bytes_per_param)


# ---------------------------------------------------------------------------------------------
# Parameters and weight bytes.


def _layer_matmul_params(cfg: ModelConfig) -> int:
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.num_heads * h + 2 * d * cfg.num_kv_heads * h + cfg.num_heads * h * d  # wq, wk, wv, wo
    mlp = 3 * d * cfg.ffn_dim  # gate, up, down
    return attention + mlp


def param_count(cfg: ModelConfig) -> int:
    """Every parameter: embedding, per-layer weights, biases and norms, final norm, untied lm_head."""
    per_layer = _layer_matmul_params(cfg) + 2 * cfg.d_model  # + attn_norm, mlp_norm
    if cfg.qkv_bias:
        per_layer += (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    embedding = cfg.vocab_size * cfg.d_model
    lm_head = 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
    return embedding + cfg.num_layers * per_layer + cfg.d_model + lm_head


def weight_bytes(cfg: ModelConfig, bytes_per_param: float | None = None) -> float:
    """Bytes of all weights; bytes_per_param defaults to cfg.dtype's (0.5 for int4, say, when quantized)."""
    return param_count(cfg) * _bytes_per_param(cfg, bytes_per_param)


# ---------------------------------------------------------------------------------------------
# KV cache.


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_elem: float = 2) -> float:
    """K and V of one token across all layers: 2 * layers * kv_heads * head_dim * bytes."""
    bytes_per_elem = _positive("bytes_per_elem", bytes_per_elem)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_elem


def kv_cache_bytes(cfg: ModelConfig, tokens: int, batch: int = 1, bytes_per_elem: float = 2) -> float:
    """KV bytes stored for `batch` sequences of `tokens` tokens each.

    Every token is counted, also under a sliding window: the paged cache keeps them all (the window
    limits what attention reads, see decode_step_bytes, not what is stored).
    """
    tokens = _int_at_least("tokens", tokens, 0)
    batch = _int_at_least("batch", batch, 1)
    return batch * tokens * kv_bytes_per_token(cfg, bytes_per_elem)


def kv_capacity_tokens(
    cfg: ModelConfig,
    gpu_memory_bytes: float,
    *,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
    reserved_bytes: float = 0,
) -> int:
    """Tokens of KV cache (summed over all sequences) that fit beside the weights; 0 if the weights don't fit.

    reserved_bytes: memory kept back for activations, logits and the runtime's workspace.
    """
    gpu_memory_bytes = _positive("gpu_memory_bytes", gpu_memory_bytes)
    if isinstance(reserved_bytes, bool) or not isinstance(reserved_bytes, (int, float)) or not reserved_bytes >= 0:
        raise ValueError(f"reserved_bytes={reserved_bytes!r} must be a number >= 0")
    free = gpu_memory_bytes - reserved_bytes - weight_bytes(cfg, weight_bytes_per_param)
    return max(0, int(free // kv_bytes_per_token(cfg, kv_bytes_per_elem)))


# ---------------------------------------------------------------------------------------------
# FLOPs.


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """2 * the matmul parameters one token passes through: every layer's projections and the lm_head.

    The embedding lookup is a gather, not a matmul, and does not count; the lm_head counts (also when
    tied to the embedding: the shared table is then used as a [D, V] matmul). Biases, norms, RoPE,
    SiLU and softmax are elementwise, O(D) per token against O(D^2), and are left out.
    """
    return 2 * (cfg.num_layers * _layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size)


def _attended_keys(cfg: ModelConfig, query_len: int, context_len: int, causal: bool) -> int:
    """Sum over the query_len new queries of the number of keys each one attends to."""
    window = cfg.sliding_window
    end = context_len + query_len  # keys in the sequence after this step
    if not causal:
        return query_len * (end if window is None else min(end, window))
    # The query at position p sees keys max(0, p - window + 1) .. p: min(p + 1, window) of them.
    first, last = context_len + 1, end  # p + 1 over the new queries
    if window is None or last <= window:
        return (first + last) * query_len // 2
    unclipped_last = min(last, window)  # p + 1 up to the window grows, past it stays at window
    unclipped = (first + unclipped_last) * (unclipped_last - first + 1) // 2 if unclipped_last >= first else 0
    return unclipped + (last - max(first - 1, window)) * window


def attention_flops(cfg: ModelConfig, query_len: int, context_len: int = 0, *, causal: bool = True) -> int:
    """FLOPs of QK^T and PV over all layers and heads: 4 * layers * heads * head_dim * (attended keys).

    The query_len queries follow context_len cached tokens. causal=True counts only the keys each query
    may see (itself and everything before it, within the sliding window): what a kernel that skips
    masked blocks does. causal=False counts every query against all context_len + query_len keys
    (clipped to the window): what a kernel computing the full score matrix does.
    """
    query_len = _int_at_least("query_len", query_len, 0)
    context_len = _int_at_least("context_len", context_len, 0)
    keys = _attended_keys(cfg, query_len, context_len, causal)
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys


def prefill_flops(
    cfg: ModelConfig, prompt_len: int, batch: int = 1, *, context_len: int = 0, all_logits: bool = True
) -> int:
    """FLOPs of a causal prefill of `batch` prompts of prompt_len tokens after context_len cached ones.

    context_len > 0 is a chunk of a chunked prefill. all_logits=False when only the last position's
    logits are computed (the lm_head then runs once per sequence, not once per token).
    """
    prompt_len = _int_at_least("prompt_len", prompt_len, 1)
    batch = _int_at_least("batch", batch, 1)
    lm_head = 2 * cfg.d_model * cfg.vocab_size
    matmul = prompt_len * matmul_flops_per_token(cfg)
    if not all_logits:
        matmul -= (prompt_len - 1) * lm_head
    return batch * (matmul + attention_flops(cfg, prompt_len, context_len, causal=True))


def decode_flops(cfg: ModelConfig, batch: int, context_len: int) -> int:
    """FLOPs of one decode step: one new token per sequence, each after context_len cached tokens."""
    batch = _int_at_least("batch", batch, 1)
    return batch * (matmul_flops_per_token(cfg) + attention_flops(cfg, 1, context_len))


# ---------------------------------------------------------------------------------------------
# Bytes.


def decode_step_bytes(
    cfg: ModelConfig,
    batch: int,
    context_len: int,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> float:
    """HBM bytes of one decode step: every weight read once, plus per sequence its cached KV read
    (only the last window - 1 tokens under a sliding window) and the new token's KV written.

    The whole embedding table counts as read, as gpt-fast counts it, though a step gathers only
    `batch` rows of it (untied Llama-2-7B: 0.26 of 13.48 GB); MBU numbers stay comparable with theirs.
    """
    batch = _int_at_least("batch", batch, 1)
    context_len = _int_at_least("context_len", context_len, 0)
    read_tokens = context_len if cfg.sliding_window is None else min(context_len, cfg.sliding_window - 1)
    kv = batch * (read_tokens + 1) * kv_bytes_per_token(cfg, kv_bytes_per_elem)
    return weight_bytes(cfg, weight_bytes_per_param) + kv


def _prefill_bytes(cfg, prompt_len, batch, context_len, weight_bytes_per_param, kv_bytes_per_elem) -> float:
    # Weights once, the cached prefix read, the prompt's KV written; activations ignored.
    read_tokens = context_len if cfg.sliding_window is None else min(context_len, cfg.sliding_window - 1)
    kv = batch * (read_tokens + prompt_len) * kv_bytes_per_token(cfg, kv_bytes_per_elem)
    return weight_bytes(cfg, weight_bytes_per_param) + kv


# ---------------------------------------------------------------------------------------------
# Accelerators.


@dataclasses.dataclass(frozen=True)
class GPU:
    """Datasheet peaks. Pass measured numbers with .replace(hbm_bytes_per_s=3.05e12) for a tighter floor."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s, no 2:4 sparsity
    hbm_bytes_per_s: float
    memory_bytes: float  # nominal capacity; the runtime keeps some back

    def __post_init__(self):
        for field in ("peak_flops", "hbm_bytes_per_s", "memory_bytes"):
            _positive(field, getattr(self, field))

    def replace(self, **changes) -> GPU:
        return dataclasses.replace(self, **changes)


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("a10", 125e12, 600e9, 24 * GiB),
        GPU("l4", 121e12, 300e9, 24 * GiB),
        GPU("a100-40gb", 312e12, 1.555e12, 40 * GiB),
        GPU("a100-80gb", 312e12, 2.039e12, 80 * GiB),
        GPU("h100-pcie", 756e12, 2.0e12, 80 * GiB),
        GPU("h100", 989e12, 3.35e12, 80 * GiB),  # SXM5
        GPU("h200", 989e12, 4.8e12, 141e9),
    )
}


def gpu(name: str) -> GPU:
    """A GPU from the GPUS table by name."""
    if name not in GPUS:
        raise ValueError(f"unknown gpu {name!r}; known: {sorted(GPUS)}")
    return GPUS[name]


def ops_per_byte(gpu: GPU) -> float:
    """FLOPs the GPU can do per byte it reads: the arithmetic intensity where compute and bandwidth balance."""
    return gpu.peak_flops / gpu.hbm_bytes_per_s


# ---------------------------------------------------------------------------------------------
# Rooflines.


def decode_arithmetic_intensity(
    cfg: ModelConfig,
    batch: int,
    context_len: int,
    *,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> float:
    """FLOPs per HBM byte of one decode step."""
    flops = decode_flops(cfg, batch, context_len)
    return flops / decode_step_bytes(cfg, batch, context_len, weight_bytes_per_param, kv_bytes_per_elem)


def critical_batch_size(
    cfg: ModelConfig,
    gpu: GPU,
    context_len: int = 0,
    *,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> float:
    """The batch (a real number; round up) at which decode turns compute-bound: intensity == ops:byte.

    FLOPs grow as batch * f and bytes as weights + batch * k (each sequence's KV), so the crossing is
    ops_per_byte * weights / (f - ops_per_byte * k). Attention alone does only 2 * q_per_kv / kv bytes
    FLOPs per KV byte, so when the KV term wins (long contexts, few query heads per kv head) no batch
    is compute-bound and this returns math.inf.
    """
    ratio = ops_per_byte(gpu)
    weights = weight_bytes(cfg, weight_bytes_per_param)
    f = decode_flops(cfg, 1, context_len)
    k = decode_step_bytes(cfg, 1, context_len, weight_bytes_per_param, kv_bytes_per_elem) - weights
    if f <= ratio * k:
        return math.inf
    return ratio * weights / (f - ratio * k)


def decode_floor_seconds(
    cfg: ModelConfig,
    gpu: GPU,
    batch: int,
    context_len: int,
    *,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> float:
    """The fastest one decode step can be: max(bytes / bandwidth, FLOPs / peak)."""
    nbytes = decode_step_bytes(cfg, batch, context_len, weight_bytes_per_param, kv_bytes_per_elem)
    return max(nbytes / gpu.hbm_bytes_per_s, decode_flops(cfg, batch, context_len) / gpu.peak_flops)


def prefill_floor_seconds(
    cfg: ModelConfig,
    gpu: GPU,
    prompt_len: int,
    batch: int = 1,
    *,
    context_len: int = 0,
    all_logits: bool = True,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> float:
    """The fastest a prefill can be: max(bytes / bandwidth, FLOPs / peak); compute-bound for all but short prompts."""
    flops = prefill_flops(cfg, prompt_len, batch, context_len=context_len, all_logits=all_logits)
    nbytes = _prefill_bytes(cfg, prompt_len, batch, context_len, weight_bytes_per_param, kv_bytes_per_elem)
    return max(nbytes / gpu.hbm_bytes_per_s, flops / gpu.peak_flops)


def mbu(bytes_moved: float, seconds: float, gpu: GPU) -> float:
    """Model bandwidth utilization: achieved bytes/s as a fraction of the GPU's HBM bandwidth."""
    bytes_moved = _positive("bytes_moved", bytes_moved)
    seconds = _positive("seconds", seconds)
    return bytes_moved / seconds / gpu.hbm_bytes_per_s


def mfu(flops: float, seconds: float, gpu: GPU) -> float:
    """Model FLOPs utilization: achieved FLOP/s as a fraction of the GPU's dense bf16 peak."""
    flops = _positive("flops", flops)
    seconds = _positive("seconds", seconds)
    return flops / seconds / gpu.peak_flops


def format_roofline(
    cfg: ModelConfig,
    gpu: GPU,
    batch: int,
    context_len: int,
    step_seconds: float,
    *,
    weight_bytes_per_param: float | None = None,
    kv_bytes_per_elem: float = 2,
) -> str:
    """Two lines for a benchmark to print about a measured decode step: bandwidth and FLOP/s against the
    GPU's peaks, then the roofline floor and how close the step came to it."""
    t = _positive("step_seconds", step_seconds)
    nbytes = decode_step_bytes(cfg, batch, context_len, weight_bytes_per_param, kv_bytes_per_elem)
    flops = decode_flops(cfg, batch, context_len)
    floor = decode_floor_seconds(
        cfg, gpu, batch, context_len, weight_bytes_per_param=weight_bytes_per_param, kv_bytes_per_elem=kv_bytes_per_elem
    )
    bound = "memory" if nbytes / gpu.hbm_bytes_per_s >= flops / gpu.peak_flops else "compute"
    gb = nbytes / 1e9
    return (
        f"{gb / t:.0f} GB/s ({100 * mbu(nbytes, t, gpu):.0f}% of HBM), "
        f"{flops / t / 1e12:.1f} TFLOP/s ({100 * mfu(flops, t, gpu):.1f}% MFU) on {gpu.name}, "
        f"{batch / t:.0f} tok/s\n"
        f"batch {batch} context {context_len}: {gb:.2f} GB and {flops / 1e9:.1f} GFLOP per step, "
        f"floor {1e3 * floor:.2f} ms ({bound}-bound), measured {1e3 * t:.2f} ms ({100 * floor / t:.0f}% of roofline)"
    )
