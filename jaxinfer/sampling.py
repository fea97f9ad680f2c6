"""Token sampling: per-row temperature, top-k, top-p, min-p and repetition penalty in one jitted step.

Semantics follow HF transformers' warpers (Temperature -> TopK -> TopP -> MinP, min_tokens_to_keep=1) and
RepetitionPenaltyLogitsProcessor, so a mixed batch of requests can share one compiled decode step: every knob is a
per-row array, and "off" is a value (top_k=0, top_p=1, min_p=0), never a Python branch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.sampling_params import SamplingParams, check_seed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling knobs as device arrays, so one compiled step serves a batch of mixed requests."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] f32, 1 = off
    min_p: jax.Array  # [B] f32, 0 = off
    repetition_penalty: jax.Array  # [B] f32, 1 = off

    @classmethod
    def from_params(cls, params: list[SamplingParams], batch_size: int) -> SamplingArrays:
        """Rows past len(params) are padding slots: greedy, so they never pull the batch into the sort path."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(params) > batch_size:
            raise ValueError(f"len(params)={len(params)} must be <= batch_size={batch_size}")
        rows = list(params) + [SamplingParams(temperature=0.0)] * (batch_size - len(params))
        return cls(
            temperature=jnp.asarray(np.array([p.temperature for p in rows], np.float32)),
            top_k=jnp.asarray(np.array([p.top_k for p in rows], np.int32)),
            top_p=jnp.asarray(np.array([p.top_p for p in rows], np.float32)),
            min_p=jnp.asarray(np.array([p.min_p for p in rows], np.float32)),
            repetition_penalty=jnp.asarray(np.array([p.repetition_penalty for p in rows], np.float32)),
        )


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits move toward "less likely" whatever their sign.

    logits [B, V] f32, seen [B, V] bool (prompt and generated tokens), penalty [B] -> [B, V] f32.
    """
    penalty = penalty[:, None]  # [B, 1]
    # Dividing a negative logit would raise its probability, hence the sign split.
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)  # [B, V]
    return jnp.where(seen, penalized, logits)


def _sorted_probs(sorted_logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Softmax over the ascending-sorted logits that survive `threshold` (the earlier filters). [B, V] -> [B, V]."""
    return jax.nn.softmax(jnp.where(sorted_logits >= threshold[:, None], sorted_logits, -jnp.inf), axis=-1)


def _top_k_threshold(sorted_logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Smallest logit kept by top-k: the k-th largest, so ties with it survive as in HF. [B, V], [B] -> [B]."""
    vocab_size = sorted_logits.shape[-1]
    k = jnp.clip(top_k, 1, vocab_size)  # [B]
    kth_largest = jnp.take_along_axis(sorted_logits, (vocab_size - k)[:, None], axis=-1)[:, 0]  # [B]
    return jnp.where(top_k > 0, kth_largest, -jnp.inf)


def _top_p_threshold(sorted_logits: jax.Array, top_p: jax.Array, threshold: jax.Array) -> jax.Array:
    """Smallest logit kept by top-p, on the distribution left after `threshold`. [B, V], [B], [B] -> [B].

    HF sorts ascending and removes tokens whose cumulative probability is <= 1 - top_p; the sort is already
    ascending, so the cumulative sum runs in HF's own order and boundary cases round the same way.
    """
    cumulative = jnp.cumsum(_sorted_probs(sorted_logits, threshold), axis=-1)  # [B, V]
    removed = cumulative <= (1.0 - top_p)[:, None]  # [B, V], a prefix since cumulative is non-decreasing
    # The most probable token always survives (min_tokens_to_keep=1).
    num_removed = jnp.minimum(jnp.sum(removed, axis=-1), sorted_logits.shape[-1] - 1)  # [B]
    cutoff = jnp.take_along_axis(sorted_logits, num_removed[:, None], axis=-1)[:, 0]  # [B]
    # HF's generate() skips the warper at top_p=1; applying it would drop underflowed (probability 0) tokens.
    return jnp.where(top_p < 1.0, cutoff, -jnp.inf)


def _min_p_threshold(sorted_logits: jax.Array, min_p: jax.Array, threshold: jax.Array) -> jax.Array:
    """Smallest logit kept by min-p: probability >= min_p * max probability, after top-k/top-p. [B] -> [B]."""
    probs = _sorted_probs(sorted_logits, threshold)  # [B, V]
    removed = probs < min_p[:, None] * probs[:, -1:]  # [B, V], a prefix since probs ascend
    num_removed = jnp.minimum(jnp.sum(removed, axis=-1), sorted_logits.shape[-1] - 1)  # [B]
    return jnp.take_along_axis(sorted_logits, num_removed[:, None], axis=-1)[:, 0]


def filter_logits(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Temperature, then top-k, top-p, min-p (HF's order); removed tokens become -inf. [B, V] -> [B, V] f32.

    Each filter keeps a prefix of the descending order, so one sort per row yields a logit threshold per filter
    and the result is `logits >= max(thresholds)`. Exact ties with a threshold are all kept (HF does the same for
    top-k; for top-p/min-p HF's unstable sort keeps an arbitrary subset of a tie straddling the cut).
    """
    # Greedy rows still pass through here in a mixed batch; dividing by 1 keeps their values finite.
    temperature = jnp.where(arrays.temperature > 0, arrays.temperature, 1.0)  # [B]
    logits = logits.astype(jnp.float32) / temperature[:, None]  # [B, V]
    sorted_logits = jnp.sort(logits, axis=-1)  # [B, V] ascending: HF's top-p order
    threshold = _top_k_threshold(sorted_logits, arrays.top_k)  # [B]
    threshold = jnp.maximum(threshold, _top_p_threshold(sorted_logits, arrays.top_p, threshold))
    threshold = jnp.maximum(threshold, _min_p_threshold(sorted_logits, arrays.min_p, threshold))
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def argmax(logits: jax.Array, vocab_axis: str | None = None) -> jax.Array:
    """[B, V] -> [B] int32, the first index of the maximum (jnp.argmax's tie rule).

    vocab_axis: inside shard_map, the mesh axis V is split over (logits are this device's [B, V / tp] columns):
    a local max and argmax, then a pmax and a pmin on [B] instead of gathering [B, V].
    """
    local = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    if vocab_axis is None:
        return local
    local_max = jnp.max(logits, axis=-1)  # [B]
    is_max = local_max == jax.lax.pmax(local_max, vocab_axis)  # [B]
    index = local + jax.lax.axis_index(vocab_axis) * logits.shape[-1]  # [B] global vocabulary ids
    return jax.lax.pmin(jnp.where(is_max, index, jnp.iinfo(jnp.int32).max), vocab_axis)


def sample(
    logits: jax.Array, arrays: SamplingArrays, keys: jax.Array, seen: jax.Array, vocab_axis: str | None = None
) -> jax.Array:
    """Next token per row. logits [B, V], keys [B] typed (or [B, 2] uint32), seen [B, V] bool -> [B] int32.

    A row's token depends only on its own logits, knobs and key, so batch composition never changes a result.
    vocab_axis: inside shard_map, logits and seen are this device's [B, V / tp] columns (jaxinfer.sharding).
    Greedy stays split; a batch with a sampled row all-gathers the logits (the top-k/top-p/min-p sort needs the
    whole row) and every device draws the same token with the same key.
    """
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, arrays.repetition_penalty)  # [B, V]
    greedy_tokens = argmax(logits, vocab_axis)  # [B]
    is_greedy = arrays.temperature == 0  # [B]

    def sampled():
        whole = logits if vocab_axis is None else jax.lax.all_gather(logits, vocab_axis, axis=1, tiled=True)
        filtered = filter_logits(whole, arrays)  # [B, V]
        # vmap over keys so each row draws from its own stream, identical to drawing it alone.
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)  # [B]
        return jnp.where(is_greedy, greedy_tokens, drawn)

    # An all-greedy batch (the common decode case) skips the [B, V] sort entirely.
    return jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, sampled)


def logprobs(
    logits: jax.Array, tokens: jax.Array, k: int, vocab_axis: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax of the raw logits [B, V] (before temperature, penalties and filters: what vLLM reports) ->
    (token_logprob [B] f32 of tokens [B], top_ids [B, k] int32, top_logprobs [B, k] f32 descending; ties: the lower
    id first, lax.top_k's order). k (static) <= V.

    vocab_axis: inside shard_map, logits are this device's [B, V / tp] columns: the normalizer takes a pmax and a
    psum on [B], the top-k a local top-k whose tp * k candidates are all-gathered and cut to k again (never [B, V]).
    """
    logits = logits.astype(jnp.float32)
    if vocab_axis is None:
        logp = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
        top_logprobs, top_ids = jax.lax.top_k(logp, k)  # [B, k] each
        return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids, top_logprobs
    local_vocab = logits.shape[-1]
    offset = jax.lax.axis_index(vocab_axis) * local_vocab  # this shard's first vocabulary id
    shifted = logits - jax.lax.pmax(jnp.max(logits, axis=-1, keepdims=True), vocab_axis)  # [B, V / tp]
    logp = shifted - jnp.log(jax.lax.psum(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True), vocab_axis))
    local = tokens - offset  # [B]: the token's column here, if this shard holds it
    held = (local >= 0) & (local < local_vocab)  # [B]
    mine = jnp.take_along_axis(logp, jnp.clip(local, 0, local_vocab - 1)[:, None], axis=-1)[:, 0]  # [B]
    token_logprob = jax.lax.psum(jnp.where(held, mine, 0.0), vocab_axis)  # [B]
    values, ids = jax.lax.top_k(logp, min(k, local_vocab))  # [B, k'] each
    # Shard after shard in id order: among equal candidates the lower id still comes first.
    values = jax.lax.all_gather(values, vocab_axis, axis=1, tiled=True)  # [B, tp * k']
    ids = jax.lax.all_gather(ids + offset, vocab_axis, axis=1, tiled=True)  # [B, tp * k']
    top_logprobs, where = jax.lax.top_k(values, k)  # [B, k] each
    return token_logprob, jnp.take_along_axis(ids, where, axis=-1), top_logprobs


def seed_key(seed: int) -> jax.Array:
    """The typed threefry key of a seed in [0, 2**64): all 64 bits count, with or without jax_enable_x64
    (jax.random.key keeps only the low 32 without it, so seed 2**32 would silently equal seed 0)."""
    return jax.random.wrap_key_data(seed_words(seed), impl="threefry2x32")


def seed_words(seed: int) -> np.ndarray:
    """[2] uint32: what jax.random.key(seed) holds under jax_enable_x64."""
    seed = check_seed(seed)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def row_keys(seed: int | list[int], batch_size: int) -> jax.Array:
    """Per-row PRNG streams. -> [B] typed keys.

    One seed: independent rows, fold_in(seed_key(seed), row). A list of seeds, one per request (padding rows
    after it): row i gets fold_in(seed_key(seed[i]), 0), the key it would have as row 0 of a batch alone, so a
    request's samples do not depend on its place in the batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if isinstance(seed, list):
        if not 1 <= len(seed) <= batch_size:
            raise ValueError(f"{len(seed)} seeds for batch_size={batch_size}")
        seeds = seed + [0] * (batch_size - len(seed))
        base = jax.random.wrap_key_data(np.stack([seed_words(s) for s in seeds]), impl="threefry2x32")  # [B]
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, 0)
    base = seed_key(seed)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.arange(batch_size, dtype=jnp.uint32))


def step_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
    """Per-row keys for decode step `step` (may be traced), so no key is reused across steps. [B] -> [B]."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
