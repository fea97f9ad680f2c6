"""SchedulerOutput -> StepInput: numpy arrays in the runner's compiled shapes (plain numpy, no jax).

Two kinds of call, both the one program `steps.compute_and_sample`: the one-token chunks (decodes, and a prompt's
last token) go into one [B, 1] call, B the smallest decode bucket (a power of two, or max_slots) that holds them;
each longer chunk goes into a [1, T] call, T the smallest prefill bucket that holds it. A step therefore runs at
most 1 + (prefill chunks) calls, each of a shape compiled at start-up; a padding row computes but writes nothing,
so a decode of 3 requests among 16 slots costs a batch of 4, not of 16.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jaxinfer.engine.scheduler import SchedulerOutput, SlotWrite


@dataclasses.dataclass
class Call:
    tokens: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [B, T] int32, -1 on padding
    seq_ids: np.ndarray  # [B] int32: slots
    sample: np.ndarray  # [B] bool
    output_index: np.ndarray  # [B] int32
    request_ids: list[int | None]  # [B]: the request whose token a sampling row draws

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


@dataclasses.dataclass
class StepInput:
    page_table: np.ndarray  # [S, pages_per_seq] int32; rows of free slots point at the null page
    lengths: np.ndarray  # [S] int32: tokens already in the cache per slot
    calls: list[Call]
    slot_writes: list[SlotWrite]
    new_pages: list[int]
    num_tokens: int  # real tokens computed
    num_padded_tokens: int  # slots in the calls' shapes that compute nothing


def powers_of_two_to(top: int, minimum: int = 1) -> tuple[int, ...]:
    """Powers of two from `minimum` below top, then top itself: the bucket sizes of one axis."""
    buckets, t = [], minimum
    while t < top:
        buckets.append(t)
        t *= 2
    return (*buckets, top)


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """The T of the [1, T] calls: 16, 32, ... up to the chunk."""
    return powers_of_two_to(prefill_chunk, 16)


def decode_buckets(max_slots: int) -> tuple[int, ...]:
    """The B of the [B, 1] calls: 1, 2, 4, ... up to max_slots."""
    return powers_of_two_to(max_slots)


def _empty_call(batch: int, length: int) -> Call:
    return Call(
        tokens=np.zeros((batch, length), np.int32),
        positions=np.full((batch, length), -1, np.int32),
        seq_ids=np.zeros((batch,), np.int32),
        sample=np.zeros((batch,), bool),
        output_index=np.zeros((batch,), np.int32),
        request_ids=[None] * batch,
    )


def warm_up_calls(max_slots: int, buckets: tuple[int, ...], prompt_lengths=None) -> list[Call]:
    """One all-padding call of each shape to compile (computes and writes nothing): every shape, or with
    prompt_lengths those that these prompts meet side by side without a prefix hit: the buckets of their whole
    chunks and the decode buckets up to one row per prompt (a step whose budget splits a chunk further meets
    that chunk's shape on first use)."""
    decodes, prefills = decode_buckets(max_slots), buckets
    if prompt_lengths is not None:
        lengths = list(prompt_lengths)
        top = _bucket(decodes, min(max(len(lengths), 1), max_slots))
        decodes = tuple(b for b in decodes if b <= top)
        chunk = buckets[-1]
        pieces = [c for n in lengths for c in (*[chunk] * (n // chunk), n % chunk) if c > 1]
        prefills = tuple(sorted({_bucket(buckets, c) for c in pieces}))
    return [*(_empty_call(b, 1) for b in decodes), *(_empty_call(1, t) for t in prefills)]


def _bucket(buckets: tuple[int, ...], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


def build(out: SchedulerOutput, *, max_slots: int, pages_per_seq: int, buckets: tuple[int, ...]) -> StepInput:
    page_table = np.zeros((max_slots, pages_per_seq), np.int32)
    lengths = np.zeros((max_slots,), np.int32)
    for slot, pages in out.page_rows.items():
        page_table[slot, : len(pages)] = pages
        lengths[slot] = out.lengths[slot]

    singles = [c for c in out.chunks if len(c.token_ids) == 1]
    calls = []
    if singles:
        decode = _empty_call(_bucket(decode_buckets(max_slots), len(singles)), 1)
        calls.append(decode)
        for row, chunk in enumerate(singles):
            _put(decode, row, chunk)
    for chunk in out.chunks:
        if len(chunk.token_ids) > 1:
            call = _empty_call(1, _bucket(buckets, len(chunk.token_ids)))
            _put(call, 0, chunk)
            calls.append(call)
    num_tokens = out.num_tokens
    padded = sum(c.tokens.size for c in calls) - num_tokens
    return StepInput(page_table, lengths, calls, out.slot_writes, out.new_pages, num_tokens, padded)


def _put(call: Call, row: int, chunk) -> None:
    n = len(chunk.token_ids)
    call.tokens[row, :n] = chunk.token_ids
    call.positions[row, :n] = np.arange(chunk.start, chunk.start + n)
    call.seq_ids[row] = chunk.slot
    call.sample[row] = chunk.sample
    call.output_index[row] = chunk.output_index
    call.request_ids[row] = chunk.request_id if chunk.sample else None
