"""The device contract: the compiled programs generate.py and the engine's runner dispatch, pure and donating.

    prefill          one chunk of prompt tokens into the cache -> each row's last-token logits
    forward_logits   one chunk into the cache -> logits at every position (score)
    decode_step      one token per row
    generate_loop    sample the first token, then decode to every row's stop or limit: one while_loop
    start_decode     the first token of a streamed decode;  continue_decode: decode on to step `until`
    write_row        one row's settings (sampling, keys, stops, limit) into a slot of RowSettings

Every function takes (params, cfg, ...) and the keyword `runtime` (jaxinfer.runtime.Runtime: attention
backend, mesh), cfg and runtime static (params in either layer layout, jaxinfer.model.with_layout), and returns what it changed; the cache (or
the decode state holding it) is donated, so it is updated in place. Shapes are the caller's buckets: each
distinct shape is one compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer import kv_cache, sharding
from jaxinfer import sampling as sampling_lib
from jaxinfer.runtime import DEFAULT as DEFAULT_RUNTIME
from jaxinfer.runtime import Runtime

_STATIC = ("cfg", "runtime")


def _prefill(params, cfg, tokens, positions, cache, seq_ids, logits, *, runtime: Runtime = DEFAULT_RUNTIME):
    """tokens [B, T] right-padded (positions -1; T a chunk, the prompt one or more chunks long), logits [B, V]
    -> (logits [B, V] float32, cache).

    Row b of the result is the logits after its last real token of this chunk; a row with no real token in it
    (its prompt ended in an earlier chunk) keeps its row of `logits`. Chunk by chunk in order, the last call
    leaves each row's logits after its whole prompt."""
    hidden, cache = sharding.forward_hidden(params, cfg, tokens, positions, cache, seq_ids, runtime=runtime)
    last = jnp.argmax(positions, axis=1)  # [B]: the highest position is the last real token
    h_last = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
    new = sharding.logits(params, cfg, h_last, mesh=runtime.mesh)  # [B, V]
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
