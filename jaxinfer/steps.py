"""The device contract: the compiled programs generate.py and the engine's runner dispatch, pure and donating.

    prefill          one chunk of prompt tokens into the cache -> each row's last-token logits
    forward_logits   one chunk into the cache -> logits at every position (score)
    decode_step      one token per row
    generate_loop    sample the first token, then decode to every row's stop or limit: one while_loop
    start_decode     the first token of a streamed decode;  continue_decode: decode on to step `until`
    write_row        one row's settings (sampling, keys, stops, limit) into a slot of RowSettings

The engine's (jaxinfer/engine/runner.py), over slots that requests come to and go from:
    compute_and_sample  rows of different requests each compute a chunk; rows that end theirs sample by slot (and,
                        when the call wants them, report the logprobs of the token and its top alternatives)
    write_slot          a newly admitted request's sampling settings, key and seen tokens into its slot
    poison_pages        NaN into pages (a test mode: a reused page must never expose what it held)

Every function takes (params, cfg, ...) and the keyword `runtime` (jaxinfer.runtime.Runtime: attention
backend, mesh), cfg and runtime static (params in either layer layout, jaxinfer.model.with_layout), and returns what it changed; the cache (or
the decode state holding it) is donated, so it is updated in place. Shapes are the caller's buckets: each
distinct shape is one compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer import kv_cache, model, sharding
from jaxinfer import sampling as sampling_lib
from jaxinfer.runtime import DEFAULT as DEFAULT_RUNTIME
from jaxinfer.runtime import Runtime

_STATIC = ("cfg", "runtime")

MAX_LOGPROBS = 20  # top alternatives compute_and_sample reports per sampled token (OpenAI's top_logprobs maximum)


def _prefill(params, cfg, tokens, positions, cache, seq_ids, logits, *, runtime: Runtime = DEFAULT_RUNTIME):
    """tokens [B, T] right-padded (positions -1; T a chunk, the prompt one or more chunks long), logits [B, V]
    -> (logits [B, V] float32, cache).

    Row b of the result is the logits after its last real token of this chunk; a row with no real token in it
    (its prompt ended in an earlier chunk) keeps its row of `logits`. Chunk by chunk in order, the last call
    leaves each row's logits after its whole prompt."""
    hidden, cache = sharding.forward_hidden(params, cfg, tokens, positions, cache, seq_ids, runtime=runtime)
    last = jnp.argmax(positions, axis=1)  # [B]: the highest position is the last real token
    h_last = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
    new = sharding.logits(params, cfg, h_last, runtime=runtime)  # [B, V]
    has_tokens = jnp.max(positions, axis=1) >= 0  # [B]
    return jnp.where(has_tokens[:, None], new, logits), cache


def _forward_logits(params, cfg, tokens, positions, cache, seq_ids, *, runtime: Runtime = DEFAULT_RUNTIME):
    """tokens [B, T] -> (logits [B, T, V] float32 at every position, cache)."""
    return sharding.forward(params, cfg, tokens, positions, cache, seq_ids, runtime=runtime)


def _decode_step(params, cfg, tokens, cache, seq_ids, active, *, runtime: Runtime = DEFAULT_RUNTIME):
    """tokens [B] at each row's cache length -> (logits [B, V], cache); inactive rows write nothing, keep their
    length."""
    positions = jnp.where(active, cache.lengths[seq_ids], -1)[:, None]  # [B, 1]
    logits, cache = sharding.forward(params, cfg, tokens[:, None], positions, cache, seq_ids, runtime=runtime)
    return logits[:, 0], cache


prefill = jax.jit(_prefill, static_argnames=_STATIC, donate_argnames=("cache", "logits"))
forward_logits = jax.jit(_forward_logits, static_argnames=_STATIC, donate_argnames=("cache",))
decode_step = jax.jit(_decode_step, static_argnames=_STATIC, donate_argnames=("cache",))


# ---------------------------------------------------------------------------------------------
# The decode loop


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


def _write_row(rows: RowSettings, slot, row: RowSettings) -> RowSettings:
    """rows [B, ...] with slot `slot` ([] int32, traced) replaced by `row`'s single row [1, ...] (stop_ids
    [1, S]: as wide as rows'). One program per (B, S), whichever slot."""
    return jax.tree.map(lambda all_rows, one: jax.lax.dynamic_update_index_in_dim(all_rows, one[0], slot, 0), rows, row)


write_row = jax.jit(_write_row, donate_argnames=("rows",))


def _emit(state: DecodeState, logits, rows: RowSettings, mesh=None) -> DecodeState:
    """Sample one token per row from logits [B, V] and append it where the row is still running."""
    B = logits.shape[0]
    keys = sampling_lib.step_keys(rows.keys, state.step)
    tok = sharding.sample(logits, rows.sampling, keys, state.seen, mesh=mesh)  # [B]
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


def _start(first_logits, cache, rows: RowSettings, seen, max_new_tokens: int, mesh) -> DecodeState:
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


def _decode_until(params, cfg, state: DecodeState, rows: RowSettings, until, runtime: Runtime) -> DecodeState:
    """Decode until step `until` (may be traced) or until every row is done: one while_loop."""
    max_steps = jnp.minimum(until, state.tokens.shape[1])

    def cond(state):
        return (state.step < max_steps) & ~jnp.all(state.done)

    def body(state):
        logits, cache = _decode_step(params, cfg, state.last, state.cache, rows.seq_ids, ~state.done, runtime=runtime)
        return _emit(dataclasses.replace(state, cache=cache), logits, rows, runtime.mesh)

    return jax.lax.while_loop(cond, body, state)


def _generate_loop(
    params, cfg, first_logits, cache, rows, seen, *, max_new_tokens: int, runtime: Runtime = DEFAULT_RUNTIME
) -> DecodeState:
    """first_logits [B, V] (prefill's), seen [B, V] -> the final DecodeState: sample, then decode until every row
    has hit a stop token or its limit, the whole loop in one program. M = max_new_tokens (static) is the width of
    the output buffer state.tokens [B, M]."""
    state = _start(first_logits, cache, rows, seen, max_new_tokens, runtime.mesh)
    return _decode_until(params, cfg, state, rows, max_new_tokens, runtime)


generate_loop = jax.jit(_generate_loop, static_argnames=(*_STATIC, "max_new_tokens"), donate_argnames=("cache",))


def _progress(state: DecodeState) -> tuple[jax.Array, ...]:
    """Copies of what a streaming host reads (tokens [B, M], num_tokens, done, stopped): buffers of their own,
    so the host can read them while the next chunk, which consumes (donates) the state, already runs."""
    return tuple(jnp.copy(x) for x in (state.tokens, state.num_tokens, state.done, state.stopped))


def _start_decode(first_logits, cache, rows, seen, *, max_new_tokens: int, runtime: Runtime = DEFAULT_RUNTIME):
    """-> (DecodeState after the first token, its progress copies)."""
    state = _start(first_logits, cache, rows, seen, max_new_tokens, runtime.mesh)
    return state, _progress(state)


def _continue_decode(params, cfg, state, rows, until, *, runtime: Runtime = DEFAULT_RUNTIME):
    """Decode on to step `until` ([] int32, traced: one program for every chunk) -> (state, progress copies)."""
    state = _decode_until(params, cfg, state, rows, until, runtime)
    return state, _progress(state)


# Streaming runs the same loop in chunks: start once, then continue to step 9, 17, ... with one compiled program.
start_decode = jax.jit(_start_decode, static_argnames=("max_new_tokens", "runtime"), donate_argnames=("cache",))
continue_decode = jax.jit(_continue_decode, static_argnames=_STATIC, donate_argnames=("state",))


# ---------------------------------------------------------------------------------------------
# The engine's step: rows of different requests, each computing its next tokens, sampled by slot.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotRows:
    """The engine's per-slot constants, written when a request is admitted (write_slot), read by every step."""

    sampling: sampling_lib.SamplingArrays  # [S] each
    keys: jax.Array  # [S] typed: each request's base key, fold_in(seed_key(seed), 0) as generate's row 0
    stop_ids: jax.Array  # [S, W] int32, -1 padded
    seen: jax.Array  # [S, V] bool: the request's prompt and output tokens (repetition penalty)


def init_slot_rows(num_slots: int, stop_width: int, vocab_size: int) -> SlotRows:
    return SlotRows(
        sampling=sampling_lib.SamplingArrays.from_params([], num_slots),
        keys=sampling_lib.row_keys(0, num_slots),
        stop_ids=jnp.full((num_slots, stop_width), -1, jnp.int32),
        seen=jnp.zeros((num_slots, vocab_size), bool),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepRows:
    """One group of an engine step's rows: B rows each computing a chunk of T tokens of one request."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32, -1 padding
    seq_ids: jax.Array  # [B] int32: slots
    sample: jax.Array  # [B] bool: the chunk ends the request's tokens, so the row samples its next one
    output_index: jax.Array  # [B] int32: that token's index in the request's output (its key)


def _compute_and_sample(
    params, cfg, cache, slots: SlotRows, page_table, lengths, rows: tuple[StepRows, ...], want_logprobs,
    *, runtime: Runtime = DEFAULT_RUNTIME,
):
    """Each row computes a chunk of one request's tokens; rows whose chunk ends the request's tokens sample its
    next one, with the key of (its seed, output index): nothing about the batch enters a row's token.

    page_table [S, pages_per_seq] and lengths [S] are the host's (tokens already cached per slot; a host-owned
    copy, so preemption and prefix hits need no device bookkeeping); rows: groups of different shapes (decode rows
    [B, 1] beside a chunk [1, T]) computed in one forward; want_logprobs [] bool (traced: one program either way)
    -> (tokens [R] int32, stopped [R] bool, logprobs, cache, slots), R the rows of all groups in order, logprobs
    (token_logprob [R] f32, top_ids [R, K] int32, top_logprobs [R, K] f32) as `_logprobs` gives them."""
    cache = dataclasses.replace(cache, page_table=page_table, lengths=lengths)
    groups = tuple(model.Rows(r.tokens, r.positions, r.seq_ids) for r in rows)
    hidden, cache = sharding.forward_rows(params, cfg, groups, cache, runtime=runtime)
    # Each row's hidden state after its chunk's last token (the highest position): [R, D]
    h_last = jnp.concatenate([h[jnp.arange(h.shape[0]), jnp.argmax(r.positions, axis=1)] for h, r in zip(hidden, rows)])
    seq_ids, sample, output_index = (jnp.concatenate([getattr(r, f) for r in rows])
                                     for f in ("seq_ids", "sample", "output_index"))
    logits = sharding.logits(params, cfg, h_last, runtime=runtime)  # [R, V]
    sampling = jax.tree.map(lambda a: a[seq_ids], slots.sampling)
    # Rows that do not sample count as greedy, so a batch of them skips the sort.
    sampling = dataclasses.replace(sampling, temperature=jnp.where(sample, sampling.temperature, 0.0))
    keys = jax.vmap(jax.random.fold_in)(slots.keys[seq_ids], output_index)  # [R]
    tok = sharding.sample(logits, sampling, keys, slots.seen[seq_ids], mesh=runtime.mesh)  # [R]
    stopped = sample & jnp.any(tok[:, None] == slots.stop_ids[seq_ids], axis=1)  # [R]
    seen_rows = jnp.where(sample, seq_ids, slots.seen.shape[0])  # [R]: rows that do not sample write out of bounds
    seen = slots.seen.at[seen_rows, tok].set(True, mode="drop")
    logprobs = _logprobs(logits, tok, want_logprobs, runtime.mesh)
    return tok, stopped, logprobs, cache, dataclasses.replace(slots, seen=seen)


def _logprobs(logits, tok, want, mesh):
    """logits [R, V] (raw, vocab-split on a mesh), tok [R] -> (token_logprob [R] f32, top_ids [R, K] int32,
    top_logprobs [R, K] f32 descending), K = min(MAX_LOGPROBS, V), from log_softmax of the raw logits when want
    ([] bool) holds, else zeros: a step that wants none runs no softmax or top-k over the vocabulary."""
    R, K = tok.shape[0], min(MAX_LOGPROBS, logits.shape[-1])

    def none():
        return jnp.zeros((R,), jnp.float32), jnp.zeros((R, K), jnp.int32), jnp.zeros((R, K), jnp.float32)

    return jax.lax.cond(want, lambda: sharding.logprobs(logits, tok, K, mesh=mesh), none)


def _write_slot(slots: SlotRows, slot, sampling: sampling_lib.SamplingArrays, seed_words, stop_ids, seen) -> SlotRows:
    """Slot `slot` ([] int32) <- one request: sampling [1] each, seed_words [2] uint32 (sampling.seed_words),
    stop_ids [W] int32, seen [V] bool. One program whatever the slot."""
    key = jax.random.fold_in(jax.random.wrap_key_data(seed_words, impl="threefry2x32"), 0)

    def put(all_rows, row):
        return jax.lax.dynamic_update_index_in_dim(all_rows, row, slot, 0)

    return SlotRows(
        sampling=jax.tree.map(lambda a, r: put(a, r[0]), slots.sampling, sampling),
        keys=put(slots.keys, key),
        stop_ids=put(slots.stop_ids, stop_ids),
        seen=put(slots.seen, seen),
    )


def _poison_pages(cache, pages) -> kv_cache.KVCache:
    """pages [P] bool -> those pages' K and V (every layer) set to NaN: a test mode's check that no step reads
    what a page held before it was handed out again. int8 pages cannot hold NaN: their codes become the largest
    and their per-vector scales NaN."""
    mask = pages[None, None, :, None, None]  # [1, 1, P, 1, 1]
    if cache.kv_cache_dtype == "int8":
        top = jnp.asarray(kv_cache.INT8_MAX, jnp.int8)
        return dataclasses.replace(
            cache, k_pages=jnp.where(mask, top, cache.k_pages), v_pages=jnp.where(mask, top, cache.v_pages),
            k_scales=jnp.where(mask[..., 0], jnp.nan, cache.k_scales),  # [L, K, P, page_size]
            v_scales=jnp.where(mask[..., 0], jnp.nan, cache.v_scales),
        )
    nan = jnp.asarray(jnp.nan, cache.k_pages.dtype)
    return dataclasses.replace(
        cache, k_pages=jnp.where(mask, nan, cache.k_pages), v_pages=jnp.where(mask, nan, cache.v_pages)
    )


compute_and_sample = jax.jit(_compute_and_sample, static_argnames=_STATIC, donate_argnames=("cache", "slots"))
write_slot = jax.jit(_write_slot, donate_argnames=("slots",))
poison_pages = jax.jit(_poison_pages, donate_argnames=("cache",))
