"""prefill, decode_step and the whole decode loop inside one jit; the host-side `generate` and `score`.

Shapes are bucketed (batch, prompt length and token budget to powers of two) so that a stream of
requests compiles a handful of programs, not one per request.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention as attention_lib
from jaxinfer import kv_cache, sharding
from jaxinfer import sampling as sampling_lib
from jaxinfer.errors import ParameterError, is_int
from jaxinfer.page_allocator import PageAllocator
from jaxinfer.sampling_params import INT32_MAX, check_seed

MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
MIN_STOP_IDS_BUCKET = 4
DEFAULT_PAGE_SIZE = 16


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Compiled steps. mesh: None runs unsharded; a jax.sharding.Mesh runs the model and sampling under shard_map
# across its tp axis (jaxinfer.sharding), with the same results.


def _prefill(params, cfg, tokens, positions, cache, seq_ids, attention_backend=None, mesh=None):
    """tokens [B, T] right-padded (positions -1) -> (logits of each row's last real token [B, V], cache)."""
    hidden, cache = sharding.forward_hidden(mesh, params, cfg, tokens, positions, cache, seq_ids, attention_backend)
    last = jnp.argmax(positions, axis=1)  # [B]: the highest position is the last real token
    h_last = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
    return sharding.logits(mesh, params, cfg, h_last), cache


def _decode_step(params, cfg, tokens, cache, seq_ids, active, attention_backend=None, mesh=None):
    """tokens [B] -> (logits [B, V], cache); inactive rows write nothing and keep their length."""
    positions = jnp.where(active, cache.lengths[seq_ids], -1)[:, None]  # [B, 1]
    logits, cache = sharding.forward(mesh, params, cfg, tokens[:, None], positions, cache, seq_ids, attention_backend)
    return logits[:, 0], cache


_STATIC = ("cfg", "attention_backend", "mesh")
prefill = jax.jit(_prefill, static_argnames=_STATIC, donate_argnames=("cache",))
decode_step = jax.jit(_decode_step, static_argnames=_STATIC, donate_argnames=("cache",))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSettings:
    """Per-row constants of a decode: which cache sequence, how to sample, when to stop."""

    seq_ids: jax.Array  # [B] int32: row b reads and writes cache sequence seq_ids[b]
    sampling: sampling_lib.SamplingArrays  # [B] each
    keys: jax.Array  # [B] per-row PRNG keys
    stop_ids: jax.Array  # [B, S] int32, -1 padded
    limits: jax.Array  # [B] int32 max new tokens; 0 for padding rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens emitted so far by the longest-running row
    last: jax.Array  # [B] int32: each row's newest token
    tokens: jax.Array  # [B, M] int32 output buffer
    num_tokens: jax.Array  # [B] int32
    stopped: jax.Array  # [B] bool: ended on a stop token
    done: jax.Array  # [B] bool: stopped or at its token limit
    seen: jax.Array  # [B, V] bool: tokens in prompt or output (repetition penalty)
    cache: kv_cache.KVCache


def _emit(state: DecodeState, logits, rows: RowSettings, mesh=None) -> DecodeState:
    """Sample one token per row from logits [B, V] and append it where the row is still running."""
    B = logits.shape[0]
    keys = sampling_lib.step_keys(rows.keys, state.step)
    tok = sharding.sample(mesh, logits, rows.sampling, keys, state.seen)  # [B]
    active = ~state.done
    tok = jnp.where(active, tok, 0)
    num_tokens = state.num_tokens + active
    stopped = state.stopped | (active & jnp.any(tok[:, None] == rows.stop_ids, axis=1))
    return dataclasses.replace(
        state,
        step=state.step + 1,
        last=tok,
        tokens=state.tokens.at[:, state.step].set(tok),
        num_tokens=num_tokens,
        stopped=stopped,
        done=state.done | stopped | (num_tokens >= rows.limits),
        seen=state.seen.at[jnp.arange(B), tok].max(active),
    )


def _start_decode(first_logits, cache, rows: RowSettings, seen, *, max_new_tokens: int, mesh=None) -> DecodeState:
    """The first token, sampled from prefill's logits [B, V]; M = max_new_tokens is the output buffer's width."""
    B = first_logits.shape[0]
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        last=jnp.zeros((B,), jnp.int32),
        tokens=jnp.zeros((B, max_new_tokens), jnp.int32),
        num_tokens=jnp.zeros((B,), jnp.int32),
        stopped=jnp.zeros((B,), bool),
        done=rows.limits <= 0,
        seen=seen,
        cache=cache,
    )
    return _emit(state, first_logits, rows, mesh)


def _continue_decode(params, cfg, state: DecodeState, rows: RowSettings, until, attention_backend=None, mesh=None):
    """Decode until step `until` (may be traced) or until every row is done: one while_loop."""
    max_steps = jnp.minimum(until, state.tokens.shape[1])

    def cond(state):
        return (state.step < max_steps) & ~jnp.all(state.done)

    def body(state):
        logits, cache = _decode_step(
            params, cfg, state.last, state.cache, rows.seq_ids, ~state.done, attention_backend, mesh
        )
        return _emit(dataclasses.replace(state, cache=cache), logits, rows, mesh)

    return jax.lax.while_loop(cond, body, state)


def _generate_loop(
    params, cfg, first_logits, cache, rows, seen, *, max_new_tokens: int, attention_backend=None, mesh=None
):
    """Sample, then decode until every row has hit a stop token or its limit: the whole loop in one program."""
    state = _start_decode(first_logits, cache, rows, seen, max_new_tokens=max_new_tokens, mesh=mesh)
    return _continue_decode(params, cfg, state, rows, max_new_tokens, attention_backend, mesh)


generate_loop = jax.jit(_generate_loop, static_argnames=(*_STATIC, "max_new_tokens"), donate_argnames=("cache",))


def _progress(state: DecodeState) -> tuple[jax.Array, ...]:
    """Copies of what a streaming host reads (tokens [B, M], num_tokens, done, stopped): buffers of their own,
    so the host can read them while the next chunk, which consumes (donates) the state, already runs."""
    return tuple(jnp.copy(x) for x in (state.tokens, state.num_tokens, state.done, state.stopped))


def _start_decode_streaming(first_logits, cache, rows, seen, *, max_new_tokens, mesh=None):
    state = _start_decode(first_logits, cache, rows, seen, max_new_tokens=max_new_tokens, mesh=mesh)
    return state, _progress(state)


def _continue_decode_streaming(params, cfg, state, rows, until, attention_backend=None, mesh=None):
    state = _continue_decode(params, cfg, state, rows, until, attention_backend, mesh)
    return state, _progress(state)


# Streaming runs the same loop in chunks: start once, then continue to step 9, 17, ... with one compiled program.
start_decode = jax.jit(
    _start_decode_streaming, static_argnames=("max_new_tokens", "mesh"), donate_argnames=("cache",)
)
continue_decode = jax.jit(_continue_decode_streaming, static_argnames=_STATIC, donate_argnames=("state",))


def _score(params, cfg, tokens, positions, cache, seq_ids, attention_backend=None, mesh=None):
    return sharding.forward(mesh, params, cfg, tokens, positions, cache, seq_ids, attention_backend)


score_forward = jax.jit(_score, static_argnames=_STATIC, donate_argnames=("cache",))


# ---------------------------------------------------------------------------------------------
# Host side: validation, bucketing, page allocation. A request is checked in full (and its pages reserved) on the
# host before anything touches the device, so a bad one raises ParameterError naming the argument and allocates
# nothing.


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"


def _check_count(name: str, value, upper: int = INT32_MAX) -> int:
    if not (is_int(value) and 1 <= value <= upper):
        raise ParameterError(name, f"must be an int in [1, {upper}]", value=value)
    return int(value)


def _token_ids(seq, vocab_size: int, tokenizer, param: str, index: int | None = None) -> list[int]:
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
        ids = _token_ids(prompt, cfg.vocab_size, model_.tokenizer, "prompts", i)
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


def _per_prompt(name: str, value, n: int) -> list:
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise ParameterError(name, f"has {len(value)} entries; pass one value or a list of {n}, one per prompt")
    return value


def _check_attention_backend(attention_backend) -> None:
    if attention_backend is not None and attention_backend not in attention_lib.BACKENDS:
        raise ParameterError("attention_backend", f"must be one of {attention_lib.BACKENDS}", value=attention_backend)


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


def _device_cache(cfg, page_table: np.ndarray, num_pages: int, page_size: int, mesh=None) -> kv_cache.KVCache:
    """The device cache for a reserved page_table [B, pages_per_seq] (on a mesh: created in place, split by kv head)."""
    batch, pages_per_seq = page_table.shape
    sizes = {"num_pages": num_pages, "page_size": page_size, "max_seqs": batch, "pages_per_seq": pages_per_seq}
    cache = kv_cache.init_cache(cfg, **sizes) if mesh is None else sharding.init_cache(cfg, mesh, **sizes)
    return dataclasses.replace(cache, page_table=jnp.asarray(page_table))


def allocate_cache(
    cfg, token_budgets: list[int], batch: int, seq_capacity: int, page_size: int, num_pages: int | None, mesh=None
):
    """Allocate pages for each sequence's token budget (all or nothing), then build the device cache."""
    page_table, num_pages = _reserve_pages(token_budgets, batch, seq_capacity, page_size, num_pages)
    return _device_cache(cfg, page_table, num_pages, page_size, mesh)


@dataclasses.dataclass
class _Request:
    """A checked generate request, on the host only: nothing allocated on the device yet."""

    token_lists: list[list[int]]
    sampling: list[sampling_lib.SamplingParams]
    seed: int | list[int]  # one for the batch (row i: keys from (seed, i)), or one per prompt (keys from (seed_i, 0))
    max_new_tokens: list[int]  # per prompt
    prompt_bucket: int  # T: the padded prompt length
    output_bucket: int  # M: the padded output width
    page_table: np.ndarray  # [B, pages_per_seq] int32, pages reserved for prompt + max_new_tokens
    num_pages: int
    page_size: int
    attention_backend: str | None


def _check_request(model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend):
    seed = _one_or_per_prompt("seed", seed, check_seed)
    max_new_tokens = _one_or_per_prompt("max_new_tokens", max_new_tokens, lambda v: _check_count("max_new_tokens", v))
    _check_attention_backend(attention_backend)
    token_lists = _check_prompts(prompts, model_, max_new_tokens)
    n = len(token_lists)
    limits = _per_prompt("max_new_tokens", max_new_tokens, n)
    params_list = _sampling_list(sampling, n)
    T = bucket(max(len(t) for t in token_lists), MIN_PROMPT_BUCKET)
    M = bucket(max(limits), MIN_NEW_TOKENS_BUCKET)
    budgets = [len(t) + limit for t, limit in zip(token_lists, limits)]
    page_table, num_pages = _reserve_pages(budgets, bucket(n), T + M, page_size, num_pages)
    if isinstance(seed, list):
        seed = _per_prompt("seed", seed, n)
    return _Request(token_lists, params_list, seed, limits, T, M, page_table, num_pages, page_size, attention_backend)


@dataclasses.dataclass
class _PrefilledBatch:
    """A validated, prefilled batch: everything the decode loop needs."""

    num_prompts: int
    first_logits: jax.Array  # [B, V] float32
    cache: kv_cache.KVCache
    rows: RowSettings
    seen: np.ndarray  # [B, V] bool
    max_new_tokens: int  # M: the bucketed output width


def _prefill_batch(model_, request: _Request) -> _PrefilledBatch:
    cfg = model_.cfg
    token_lists = request.token_lists
    n = len(token_lists)
    B = request.page_table.shape[0]
    cache = _device_cache(cfg, request.page_table, request.num_pages, request.page_size, model_.mesh)

    tokens, positions = _padded_batch(token_lists, B, request.prompt_bucket)
    seq_ids = jnp.arange(B, dtype=jnp.int32)
    logits, cache = prefill(
        model_.params, cfg, tokens, positions, cache, seq_ids, request.attention_backend, model_.mesh
    )

    stops = [sorted(set(cfg.eos_token_ids) | set(p.stop_token_ids)) for p in request.sampling]
    stop_ids = np.full((B, bucket(max(map(len, stops), default=1), MIN_STOP_IDS_BUCKET)), -1, np.int32)
    for i, ids in enumerate(stops):
        stop_ids[i, : len(ids)] = ids
    limits = np.zeros((B,), np.int32)
    limits[:n] = request.max_new_tokens
    seen = np.zeros((B, cfg.vocab_size), bool)
    for i, ids in enumerate(token_lists):
        seen[i, ids] = True
    rows = RowSettings(
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
) -> list[GenerationOutput]:
    """Generate for a ragged batch of prompts (a list of strings or token-id lists); row i samples with keys
    derived from (seed, i). A bad argument raises ParameterError before any device work."""
    request = _check_request(model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend)
    batch = _prefill_batch(model_, request)
    state = generate_loop(
        model_.params, model_.cfg, batch.first_logits, batch.cache, batch.rows, batch.seen,
        max_new_tokens=batch.max_new_tokens, attention_backend=attention_backend, mesh=model_.mesh,
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
) -> Iterator[StreamChunk]:
    """Like generate, but yields tokens as they come: the same loop run in compiled chunks of chunk_tokens steps.

    The tokens are identical to generate's. The arguments are checked here, at the call (ParameterError);
    prefill and decoding happen on the first next().
    """
    chunk_tokens = _check_count("chunk_tokens", chunk_tokens)
    request = _check_request(model_, prompts, max_new_tokens, sampling, seed, page_size, num_pages, attention_backend)
    return _stream(model_, request, chunk_tokens)


def _stream(model_, request: _Request, chunk_tokens: int) -> Iterator[StreamChunk]:
    batch = _prefill_batch(model_, request)
    n = batch.num_prompts
    state, progress = start_decode(
        batch.first_logits, batch.cache, batch.rows, batch.seen, max_new_tokens=batch.max_new_tokens, mesh=model_.mesh
    )
    emitted = np.zeros((n,), np.int64)
    for until in itertools.count(1 + chunk_tokens, chunk_tokens):
        # Dispatch the next chunk before reading this one, so the device never waits for the host. Every active
        # row emits one token per step, so the step count (and `until`) is known without reading the device.
        state, next_progress = continue_decode(
            model_.params, model_.cfg, state, batch.rows, until, request.attention_backend, model_.mesh
        )
        out, num_out, done, stopped = (np.asarray(x) for x in progress)
        yield StreamChunk(
            [out[i, emitted[i] : num_out[i]].tolist() for i in range(n)],
            [_finish_reason(stopped[i]) if done[i] else None for i in range(n)],
        )
        if done[:n].all():
            return
        emitted, progress = num_out[:n], next_progress


def score(model_, token_ids, *, page_size: int = DEFAULT_PAGE_SIZE, attention_backend: str | None = None):
    """Logits at every position of one sequence (a str, or a list or 1-D array of token ids): np.ndarray [T, V]
    float32. A bad argument raises ParameterError before any device work."""
    cfg = model_.cfg
    _check_attention_backend(attention_backend)
    if isinstance(token_ids, (np.ndarray, jax.Array)) and np.ndim(token_ids) >= 2:
        raise ParameterError("token_ids", f"is a {np.ndim(token_ids)}-D array; score takes one sequence")
    is_list = isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes))
    if is_list and any(isinstance(t, (str, Sequence, np.ndarray)) for t in token_ids):
        raise ParameterError("token_ids", "is a list of sequences; score takes one sequence")
    ids = _token_ids(token_ids, cfg.vocab_size, model_.tokenizer, "token_ids")
    if len(ids) > cfg.max_position_embeddings:
        reason = f"length {len(ids)} exceeds the model's context max_position_embeddings={cfg.max_position_embeddings}"
        raise ParameterError("token_ids", reason)
    T = bucket(len(ids), MIN_PROMPT_BUCKET)
    page_table, num_pages = _reserve_pages([len(ids)], 1, T, page_size, None)
    cache = _device_cache(cfg, page_table, num_pages, page_size, model_.mesh)
    tokens, positions = _padded_batch([ids], 1, T)
    logits, _ = score_forward(
        model_.params, cfg, tokens, positions, cache, jnp.zeros((1,), jnp.int32), attention_backend, model_.mesh
    )
    return np.asarray(logits[0, : len(ids)])
