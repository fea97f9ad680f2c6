"""The host-side batch API over the compiled steps (jaxinfer/steps.py): `generate`, `generate_stream`, `score`.

Shapes are bucketed so that a stream of requests compiles a handful of programs, not one per request: the batch
to a power of two, the output width to a power of two >= 16, the cache's capacity per sequence to a power of two
>= 32, and the prompt to chunks: a prompt up to `prefill_chunk` tokens is one chunk (its length bucketed to a
power of two or 1.5 times one, >= 16, at most the chunk), a longer one is prefilled chunk by chunk into the paged cache with the
one program of chunk length, whatever the prompt's length.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention as attention_lib
from jaxinfer import kv_cache, sharding, steps
from jaxinfer import sampling as sampling_lib
from jaxinfer.errors import ParameterError, is_int
from jaxinfer.page_allocator import PageAllocator
from jaxinfer.runtime import Runtime
from jaxinfer.sampling_params import INT32_MAX, check_seed

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
MIN_CAPACITY_BUCKET = 32
MIN_STOP_IDS_BUCKET = 4
DEFAULT_PAGE_SIZE = 16
# Tokens per prefill call: 256 measured best of 128 / 256 / 512 for a 4,000-token prompt on the 2-core CPU
# (profiles/README.md): the [K, G, T, block] score tiles stay in cache; longer chunks amortise the weights' reads
# over more tokens, which matters less once a prompt is past a few hundred tokens.
DEFAULT_PREFILL_CHUNK = 256


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The smallest power of two, or one and a half times one, >= max(n, MIN_PROMPT_BUCKET): a one-chunk prompt is
    padded by at most a third, not a half (a 41-token prompt: 48 rows, not 64; its first token came 25-35% sooner on
    the default model, 2026-12-03). At most twice the programs of powers of two alone."""
    power = bucket(n, MIN_PROMPT_BUCKET)
    three_quarters = power // 4 * 3
    return three_quarters if power >= 32 and three_quarters >= n else power


def prompt_chunks(longest_prompt: int, prefill_chunk: int) -> tuple[int, int]:
    """-> (T, n): prompts of up to longest_prompt tokens are prefilled in n calls of T tokens each."""
    if longest_prompt <= prefill_chunk:
        return min(prompt_bucket(longest_prompt), prefill_chunk), 1
    return prefill_chunk, -(-longest_prompt // prefill_chunk)


# ---------------------------------------------------------------------------------------------
# Host side: validation, bucketing, page allocation. A request is checked in full (and its pages reserved) on the
# host before anything touches the device, so a bad one raises ParameterError naming the argument and allocates
# nothing.


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"


def check_count(name: str, value, upper: int = INT32_MAX) -> int:
    if not (is_int(value) and 1 <= value <= upper):
        raise ParameterError(name, f"must be an int in [1, {upper}]", value=value)
    return int(value)


def check_token_ids(seq, vocab_size: int, tokenizer, param: str, index: int | None = None) -> list[int]:
    """One sequence (a str, encoded, or ints: a list, tuple or 1-D integer array) -> its token ids, each checked."""
    if isinstance(seq, str):
        if tokenizer is None:
            raise ParameterError(param, "is a string but the model has no tokenizer; pass token ids", index=index)
        ids = tokenizer.encode(seq)
    else:
        if seq is None:
            raise ParameterError(param, "must be a str or a list of token ids", value=None, index=index)
        if isinstance(seq, (bytes, bytearray)):  # a Sequence of ints to Python, but never token ids
            raise ParameterError(param, "is bytes; decode it to a str, or pass token ids", index=index)
        if isinstance(seq, (np.ndarray, jax.Array)) and np.ndim(seq) >= 1:
            seq = np.asarray(seq).tolist()  # Python scalars, checked as a list's are: a float array is refused
        if not isinstance(seq, Sequence):
            raise ParameterError(param, f"must be a str or a list of token ids, not {type(seq).__name__}", index=index)
        for position, t in enumerate(seq):
            if not is_int(t):
                if isinstance(t, Sequence) and not isinstance(t, (str, bytes)):
                    reason = f"is nested deeper than token ids: position {position} is a {type(t).__name__}"
                    raise ParameterError(param, reason, index=index)
                raise ParameterError(param, f"has token id {t!r} at position {position}, not an int", index=index)
        ids = [int(t) for t in seq]
    if not ids:
        raise ParameterError(param, "is empty", index=index)
    for position, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            reason = f"has token id {t} at position {position} outside the vocabulary [0, {vocab_size})"
            raise ParameterError(param, reason, index=index)
    return ids


def _check_prompts(prompts, model_, max_new_tokens) -> list[list[int]]:
    """Token-id lists for prompts (strings encoded), each checked to fit with its max_new_tokens (an int, or one
    per prompt) in the context."""
    cfg = model_.cfg
    if prompts is None:
        raise ParameterError("prompts", "must be a list of prompts (strings or token-id lists)", value=None)
    if isinstance(prompts, str):
        raise ParameterError("prompts", "is a str, not a list of prompts; for one prompt pass [text]")
    if isinstance(prompts, (bytes, bytearray)):
        raise ParameterError("prompts", "is bytes, not a list of prompts; decode it to a str and pass [text]")
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) >= 1:
        prompts = np.asarray(prompts).tolist()  # a 2-D integer array: one row per prompt
    if not isinstance(prompts, Sequence):
        reason = f"must be a list of prompts (strings or token-id lists), not {type(prompts).__name__}"
        raise ParameterError("prompts", reason)
    if len(prompts) == 0:
        raise ParameterError("prompts", "must not be empty", value=prompts)
    if all(is_int(p) for p in prompts):
        raise ParameterError("prompts", "is a flat list of ints; pass a list of prompts: [[1, 2, 3]]")
    token_lists = []
    for i, prompt in enumerate(prompts):
        ids = check_token_ids(prompt, cfg.vocab_size, model_.tokenizer, "prompts", i)
        limit = max_new_tokens[i] if isinstance(max_new_tokens, list) else max_new_tokens
        if len(ids) + limit > cfg.max_position_embeddings:
            reason = (
                f"length {len(ids)} + max_new_tokens={limit} exceeds the model's context "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
            raise ParameterError("prompts", reason, index=i)
        token_lists.append(ids)
    return token_lists


def _sampling_list(sampling_params, n: int) -> list[sampling_lib.SamplingParams]:
    if sampling_params is None:
        return [sampling_lib.SamplingParams()] * n
    if isinstance(sampling_params, sampling_lib.SamplingParams):
        return [sampling_params] * n
    if isinstance(sampling_params, (str, bytes)) or not isinstance(sampling_params, Sequence):
        reason = f"must be a SamplingParams or a list of {n} (one per prompt), not {type(sampling_params).__name__}"
        raise ParameterError("sampling", reason)
    if len(sampling_params) != n:
        reason = f"has {len(sampling_params)} entries; pass one SamplingParams or a list of {n}, one per prompt"
        raise ParameterError("sampling", reason)
    for i, p in enumerate(sampling_params):
        if not isinstance(p, sampling_lib.SamplingParams):
            raise ParameterError("sampling", f"must be a SamplingParams, not {type(p).__name__}", index=i)
    return list(sampling_params)


def _one_or_per_prompt(name: str, value, check):
    """An int checked by `check`, or a list/tuple of them (one per prompt: its length is checked later)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParameterError(name, "must be an int or a non-empty list of one per prompt", value=value)
        checked = []
        for i, v in enumerate(value):
            try:
                checked.append(check(v))
            except ParameterError as e:
                raise ParameterError(name, e.reason, value=v, index=i) from None
        return checked
    return check(value)


def per_prompt(name: str, value, n: int) -> list:
    """One value for every prompt, or a list of n (one per prompt) -> a list of n; ParameterError otherwise."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise ParameterError(name, f"has {len(value)} entries; pass one value or a list of {n}, one per prompt")
    return value


def check_attention_backend(attention_backend, kv_cache_dtype: str | None = None) -> None:
    """ParameterError naming attention_backend unless it is a backend that reads a cache of kv_cache_dtype."""
    if attention_backend is not None and attention_backend not in attention_lib.BACKENDS:
        raise ParameterError("attention_backend", f"must be one of {attention_lib.BACKENDS}", value=attention_backend)
    try:
        backend = attention_lib.resolve_backend(attention_backend)
    except ValueError as e:  # "cpu" asked for where the CPU kernels did not build
        raise ParameterError("attention_backend", str(e), value=attention_backend) from None
    if kv_cache_dtype is not None and backend not in attention_lib.QUANTIZED_CACHE_BACKENDS:
        reason = (f"reads float caches only, not kv_cache_dtype={kv_cache_dtype!r}; "
                  f"use one of {attention_lib.QUANTIZED_CACHE_BACKENDS}")
        raise ParameterError("attention_backend", reason, value=backend)


def _runtime(model_, attention_backend) -> Runtime:
    check_attention_backend(attention_backend, model_.kv_cache_dtype)
    return Runtime(attention_backend=attention_backend, mesh=model_.mesh, quantized_matmul=model_.quantized_matmul)


def _padded_batch(token_lists: list[list[int]], batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens [batch, length] and positions [batch, length] (-1 on padding)."""
    tokens = np.zeros((batch, length), np.int32)
    positions = np.full((batch, length), -1, np.int32)
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)] = ids
        positions[i, : len(ids)] = np.arange(len(ids))
    return tokens, positions


def _reserve_pages(
    token_budgets: list[int], batch: int, seq_capacity: int, page_size: int, num_pages: int | None
) -> tuple[np.ndarray, int]:
    """Pages for each sequence's token budget, all or nothing (PagePoolExhausted), on the host:
    -> (page_table [batch, pages_per_seq] int32, num_pages)."""
    if not is_int(page_size) or page_size < 1:
        raise ParameterError("page_size", "must be an int >= 1", value=page_size)
    pages_per_seq = -(-seq_capacity // page_size)
    num_pages = batch * pages_per_seq if num_pages is None else num_pages
    allocator = PageAllocator(num_pages, page_size, pages_per_seq)
    allocator.reserve(dict(enumerate(token_budgets)))
    return allocator.page_table(batch), num_pages


def _device_cache(
    cfg, page_table: np.ndarray, num_pages: int, page_size: int, mesh=None, kv_cache_dtype: str | None = None
) -> kv_cache.KVCache:
    """The device cache for a reserved page_table [B, pages_per_seq] (on a mesh: created in place, split by kv head),
    stored as kv_cache_dtype (None: the model's dtype; "int8" | "fp8": jaxinfer.kv_cache)."""
    batch, pages_per_seq = page_table.shape
    sizes = {"num_pages": num_pages, "page_size": page_size, "max_seqs": batch, "pages_per_seq": pages_per_seq,
             "kv_cache_dtype": kv_cache_dtype}
    cache = kv_cache.init_cache(cfg, **sizes) if mesh is None else sharding.init_cache(cfg, mesh, **sizes)
    return dataclasses.replace(cache, page_table=jnp.asarray(page_table))


def allocate_cache(
    cfg, token_budgets: list[int], batch: int, seq_capacity: int, page_size: int, num_pages: int | None, mesh=None,
    kv_cache_dtype: str | None = None,
):
    """Allocate pages for each sequence's token budget (all or nothing), then build the device cache (stored as
    kv_cache_dtype: a Model's kv_cache_dtype)."""
    page_table, num_pages = _reserve_pages(token_budgets, batch, seq_capacity, page_size, num_pages)
    return _device_cache(cfg, page_table, num_pages, page_size, mesh, kv_cache_dtype)


@dataclasses.dataclass
class _Request:
    """A checked generate request, on the host only: nothing allocated on the device yet."""

    token_lists: list[list[int]]
    sampling: list[sampling_lib.SamplingParams]
    seed: int | list[int]  # one for the batch (row i: keys from (seed, i)), or one per prompt (keys from (seed_i, 0))
    max_new_tokens: list[int]  # per prompt
    chunk: int  # T: tokens per prefill call
    num_chunks: int  # prefill calls: the longest prompt is at most chunk * num_chunks tokens
    output_bucket: int  # M: the padded output width
    page_table: np.ndarray  # [B, pages_per_seq] int32, pages reserved for prompt + max_new_tokens
    num_pages: int
    page_size: int
    runtime: Runtime


def _check_request(
    model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend, prefill_chunk
):
    seed = _one_or_per_prompt("seed", seed, check_seed)
    max_new_tokens = _one_or_per_prompt("max_new_tokens", max_new_tokens, lambda v: check_count("max_new_tokens", v))
    runtime = _runtime(model_, attention_backend)
    prefill_chunk = check_count("prefill_chunk", prefill_chunk)
    token_lists = _check_prompts(prompts, model_, max_new_tokens)
    n = len(token_lists)
    limits = per_prompt("max_new_tokens", max_new_tokens, n)
    params_list = _sampling_list(sampling, n)
    T, num_chunks = prompt_chunks(max(len(t) for t in token_lists), prefill_chunk)
    M = bucket(max(limits), MIN_NEW_TOKENS_BUCKET)
    budgets = [len(t) + limit for t, limit in zip(token_lists, limits)]
    capacity = bucket(max(budgets), MIN_CAPACITY_BUCKET)
    page_table, num_pages = _reserve_pages(budgets, bucket(n), capacity, page_size, num_pages)
    if isinstance(seed, list):
        seed = per_prompt("seed", seed, n)
    return _Request(
        token_lists, params_list, seed, limits, T, num_chunks, M, page_table, num_pages, page_size, runtime
    )


def _prefill_chunks(model_, tokens, positions, cache, seq_ids, chunk: int, runtime: Runtime):
    """tokens, positions [B, n * chunk] (host arrays) -> (each row's logits after its last prompt token [B, V], cache):
    n calls of the one prefill program, in order."""
    B = tokens.shape[0]
    logits = jnp.zeros((B, model_.cfg.vocab_size), jnp.float32)
    if runtime.mesh is not None:  # the layout prefill returns, so every chunk runs the same program
        logits = jax.device_put(logits, sharding.vocab_split(runtime.mesh))
    for start in range(0, tokens.shape[1], chunk):
        window = slice(start, start + chunk)
        logits, cache = steps.prefill(
            model_.params, model_.cfg, tokens[:, window], positions[:, window], cache, seq_ids, logits,
            runtime=runtime,
        )
    return logits, cache


@dataclasses.dataclass
class _PrefilledBatch:
    """A validated, prefilled batch: everything the decode loop needs."""

    num_prompts: int
    first_logits: jax.Array  # [B, V] float32
    cache: kv_cache.KVCache
    rows: steps.RowSettings
    seen: np.ndarray  # [B, V] bool
    max_new_tokens: int  # M: the bucketed output width


def _prefill_batch(model_, request: _Request) -> _PrefilledBatch:
    cfg = model_.cfg
    token_lists = request.token_lists
    n = len(token_lists)
    B = request.page_table.shape[0]
    cache = _device_cache(cfg, request.page_table, request.num_pages, request.page_size, model_.mesh,
                          model_.kv_cache_dtype)

    tokens, positions = _padded_batch(token_lists, B, request.chunk * request.num_chunks)
    seq_ids = jnp.arange(B, dtype=jnp.int32)
    logits, cache = _prefill_chunks(model_, tokens, positions, cache, seq_ids, request.chunk, request.runtime)

    stops = [sorted(p.stop_ids(cfg.eos_token_ids)) for p in request.sampling]
    stop_ids = np.full((B, bucket(max(map(len, stops), default=1), MIN_STOP_IDS_BUCKET)), -1, np.int32)
    for i, ids in enumerate(stops):
        stop_ids[i, : len(ids)] = ids
    limits = np.zeros((B,), np.int32)
    limits[:n] = request.max_new_tokens
    seen = np.zeros((B, cfg.vocab_size), bool)
    for i, ids in enumerate(token_lists):
        seen[i, ids] = True
    rows = steps.RowSettings(
        seq_ids=seq_ids,
        sampling=sampling_lib.SamplingArrays.from_params(request.sampling, B),
        keys=sampling_lib.row_keys(request.seed, B),  # a list: each row's keys as if it ran alone
        stop_ids=jnp.asarray(stop_ids),
        limits=jnp.asarray(limits),
    )
    return _PrefilledBatch(n, logits, cache, rows, seen, request.output_bucket)


def _finish_reason(stopped: bool) -> str:
    return "stop" if stopped else "length"


def generate(
    model_,
    prompts,
    max_new_tokens: int = 32,
    sampling: sampling_lib.SamplingParams | Sequence[sampling_lib.SamplingParams] | None = None,
    seed: int = 0,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    num_pages: int | None = None,
    attention_backend: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> list[GenerationOutput]:
    """Generate for a ragged batch of prompts (a list of strings or token-id lists); row i samples with keys
    derived from (seed, i). A bad argument raises ParameterError before any device work.

    prefill_chunk: prompts longer than this many tokens are prefilled chunk by chunk (the same tokens)."""
    request = _check_request(
        model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend, prefill_chunk
    )
    batch = _prefill_batch(model_, request)
    state = steps.generate_loop(
        model_.params, model_.cfg, batch.first_logits, batch.cache, batch.rows, batch.seen,
        max_new_tokens=batch.max_new_tokens, runtime=request.runtime,
    )
    out, num_out, stopped = np.asarray(state.tokens), np.asarray(state.num_tokens), np.asarray(state.stopped)
    results = []
    for i in range(batch.num_prompts):
        ids = out[i, : num_out[i]].tolist()
        text = model_.tokenizer.decode(ids) if model_.tokenizer is not None else None
        results.append(GenerationOutput(ids, text, _finish_reason(stopped[i])))
    return results


@dataclasses.dataclass
class StreamChunk:
    new_tokens: list[list[int]]  # per prompt: the tokens produced since the previous chunk
    finish_reasons: list[str | None]  # per prompt: "stop" | "length" once finished, else None


def generate_stream(
    model_,
    prompts,
    max_new_tokens: int = 32,
    sampling: sampling_lib.SamplingParams | Sequence[sampling_lib.SamplingParams] | None = None,
    seed: int = 0,
    *,
    chunk_tokens: int = 8,
    page_size: int = DEFAULT_PAGE_SIZE,
    num_pages: int | None = None,
    attention_backend: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[StreamChunk]:
    """Like generate, but yields tokens as they come: the same loop run in compiled chunks of chunk_tokens steps.

    The tokens are identical to generate's. The arguments are checked here, at the call (ParameterError);
    prefill and decoding happen on the first next().
    """
    chunk_tokens = check_count("chunk_tokens", chunk_tokens)
    request = _check_request(
        model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend, prefill_chunk
    )
    return _stream(model_, request, chunk_tokens)


def _stream(model_, request: _Request, chunk_tokens: int) -> Iterator[StreamChunk]:
    batch = _prefill_batch(model_, request)
    n = batch.num_prompts
    state, progress = steps.start_decode(
        batch.first_logits, batch.cache, batch.rows, batch.seen, max_new_tokens=batch.max_new_tokens,
        runtime=request.runtime,
    )
    emitted = np.zeros((n,), np.int64)
    for until in itertools.count(1 + chunk_tokens, chunk_tokens):
        # Dispatch the next chunk before reading this one, so the device never waits for the host. Every active
        # row emits one token per step, so the step count (and `until`) is known without reading the device.
        state, next_progress = steps.continue_decode(
            model_.params, model_.cfg, state, batch.rows, until, runtime=request.runtime
        )
        out, num_out, done, stopped = (np.asarray(x) for x in progress)
        yield StreamChunk(
            [out[i, emitted[i] : num_out[i]].tolist() for i in range(n)],
            [_finish_reason(stopped[i]) if done[i] else None for i in range(n)],
        )
        if done[:n].all():
            return
        emitted, progress = num_out[:n], next_progress


def score(
    model_,
    token_ids,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    attention_backend: str | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
):
    """Logits at every position of one sequence (a str, or a list or 1-D array of token ids): np.ndarray [T, V]
    float32, computed chunk by chunk as a prompt is prefilled. A bad argument raises ParameterError before any
    device work."""
    cfg = model_.cfg
    runtime = _runtime(model_, attention_backend)
    prefill_chunk = check_count("prefill_chunk", prefill_chunk)
    if isinstance(token_ids, (np.ndarray, jax.Array)) and np.ndim(token_ids) >= 2:
        raise ParameterError("token_ids", f"is a {np.ndim(token_ids)}-D array; score takes one sequence")
    is_list = isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes))
    if is_list and any(isinstance(t, (str, Sequence, np.ndarray)) for t in token_ids):
        raise ParameterError("token_ids", "is a list of sequences; score takes one sequence")
    ids = check_token_ids(token_ids, cfg.vocab_size, model_.tokenizer, "token_ids")
    if len(ids) > cfg.max_position_embeddings:
        reason = f"length {len(ids)} exceeds the model's context max_position_embeddings={cfg.max_position_embeddings}"
        raise ParameterError("token_ids", reason)
    T, num_chunks = prompt_chunks(len(ids), prefill_chunk)
    page_table, num_pages = _reserve_pages([len(ids)], 1, bucket(len(ids), MIN_CAPACITY_BUCKET), page_size, None)
    cache = _device_cache(cfg, page_table, num_pages, page_size, model_.mesh, model_.kv_cache_dtype)
    tokens, positions = _padded_batch([ids], 1, T * num_chunks)
    seq_ids = jnp.zeros((1,), jnp.int32)
    out = []
    for start in range(0, T * num_chunks, T):
        window = slice(start, start + T)
        logits, cache = steps.forward_logits(
            model_.params, cfg, tokens[:, window], positions[:, window], cache, seq_ids, runtime=runtime
        )
        out.append(np.asarray(logits[0]))
    return np.concatenate(out)[: len(ids)]
