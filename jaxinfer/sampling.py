"""Token sampling: per-row temperature, top-k, top-p, min-p and repetition penalty in one jitted step.

Semantics follow HF transformers' warpers (Temperature -> TopK -> TopP -> MinP, min_tokens_to_keep=1) and
RepetitionPenaltyLogitsProcessor, so a mixed batch of requests can share one compiled decode step: every knob is a
per-row array, and "off" is a value (top_k=0, top_p=1, min_p=0), never a Python branch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, validated on the host before anything is traced."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        # Normalize to plain Python scalars so equal settings hash and compare equal (np.float32(0.5) == 0.5 etc.).
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a real number")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise ValueError(f"top_k={self.top_k!r} must be an int")
        object.__setattr__(self, "top_k", int(self.top_k))

        # `not (x >= 0)` rather than `x < 0` so NaN is rejected too.
        if not (0.0 <= self.temperature < math.inf):
            raise ValueError(f"temperature={self.temperature} must be >= 0 and finite")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if not (0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 and finite")

        stop_token_ids = tuple(self.stop_token_ids)
        for token_id in stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or token_id < 0:
                raise ValueError(f"stop_token_ids={stop_token_ids!r} must be non-negative ints (bad: {token_id!r})")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def row_keys(seed: int, batch_size: int) -> jax.Array:
    """Independent per-row streams from one seed: fold_in(key(seed), row). -> [B] typed keys."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    base = jax.random.key(seed)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(jnp.arange(batch_size, dtype=jnp.uint32))


def step_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
    """Per-row keys for decode step `step` (may be traced), so no key is reused across steps. [B] -> [B]."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
