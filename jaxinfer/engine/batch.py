"""SchedulerOutput -> StepInput: numpy arrays in the runner's compiled shapes (plain numpy, no jax).

Two kinds of call, both the one program `steps.compute_and_sample`: every one-token chunk (decodes, and a prompt's
last token) goes into one [max_slots, 1] call, row = slot; each longer chunk goes into a [1, T] call, T the
smallest prefill bucket that holds it. A step therefore runs at most 1 + (prefill chunks) calls, each of a shape
compiled at start-up.
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


def prefill_buckets(prefill_chunk: int, minimum: int = 16) -> tuple[int, ...]:
    """The [1, T] shapes: powers of two from `minimum` below prefill_chunk, and prefill_chunk itself."""
    buckets, t = [], minimum
    while t < prefill_chunk:
        buckets.append(t)
        t *= 2
    return (*buckets, prefill_chunk)


def _empty_call(batch: int, length: int) -> Call:
    return Call(
        tokens=np.zeros((batch, length), np.int32),
        positions=np.full((batch, length), -1, np.int32),
        seq_ids=np.zeros((batch,), np.int32),
        sample=np.zeros((batch,), bool),
        output_index=np.zeros((batch,), np.int32),
        request_ids=[None] * batch,
    )


def warm_up_calls(max_slots: int, buckets: tuple[int, ...]) -> list[Call]:
    """One all-padding call of every compiled shape: computes and writes nothing."""
    return [_empty_call(max_slots, 1), *(_empty_call(1, t) for t in buckets)]


def build(out: SchedulerOutput, *, max_slots: int, pages_per_seq: int, buckets: tuple[int, ...]) -> StepInput:
    page_table = np.zeros((max_slots, pages_per_seq), np.int32)
    lengths = np.zeros((max_slots,), np.int32)
    for slot, pages in out.page_rows.items():
        page_table[slot, : len(pages)] = pages
        lengths[slot] = out.lengths[slot]

    calls = []
    decode = None
    for chunk in out.chunks:
        n = len(chunk.token_ids)
        if n == 1:
            if decode is None:
                decode = _empty_call(max_slots, 1)
                decode.seq_ids[:] = np.arange(max_slots)
            call, row = decode, chunk.slot
        else:
            call, row = _empty_call(1, buckets[bisect.bisect_left(buckets, n)]), 0
            call.seq_ids[0] = chunk.slot
            calls.append(call)
        call.tokens[row, :n] = chunk.token_ids
        call.positions[row, :n] = np.arange(chunk.start, chunk.start + n)
        call.sample[row] = chunk.sample
        call.output_index[row] = chunk.output_index
        call.request_ids[row] = chunk.request_id if chunk.sample else None
    if decode is not None:
        calls.insert(0, decode)
    num_tokens = out.num_tokens
    padded = sum(c.tokens.size for c in calls) - num_tokens
    return StepInput(page_table, lengths, calls, out.slot_writes, out.new_pages, num_tokens, padded)
