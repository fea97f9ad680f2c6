"""SchedulerOutput -> StepInput: numpy arrays in the runner's compiled shapes (plain numpy, no jax).

Two kinds of row group, computed by the one program `steps.compute_and_sample`: the one-token chunks (decodes, and
a prompt's last token) go into one [B, 1] group, B the smallest decode bucket (a power of two, or max_slots) that
holds them; each longer chunk into a [1, T] group, T the smallest prefill bucket that holds it. A call is one group,
or the decode group beside one chunk (one forward, one read of the weights: a step of decodes and a short chunk
costs little more than the decodes alone) where that pair of shapes was compiled. A step therefore runs at most
1 + (prefill chunks) calls, each of a shape compiled at start-up; a padding row computes but writes nothing, so a
decode of 3 requests among 16 slots costs a batch of 4, not of 16.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jaxinfer.engine.scheduler import SchedulerOutput, SlotWrite


@dataclasses.dataclass
class Group:
    tokens: np.ndarray  # [B, T] int32
    positions: np.ndarray  # [B, T] int32, -1 on padding
    seq_ids: np.ndarray  # [B] int32: slots
    sample: np.ndarray  # [B] bool
    output_index: np.ndarray  # [B] int32
    request_ids: list[int | None]  # [B]: the request whose token a sampling row draws
    logprobs: list[int | None]  # [B]: top alternatives that request asked to see with the token (None: no logprobs)

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape


@dataclasses.dataclass
class Call:
    groups: list[Group]  # computed in one forward; the sampled tokens come back row by row, group after group

    @property
    def shape(self) -> tuple[tuple[int, int], ...]:
        """The compiled program's key: each group's [B, T]."""
        return tuple(g.shape for g in self.groups)

    @property
    def request_ids(self) -> list[int | None]:
        return [r for g in self.groups for r in g.request_ids]

    @property
    def logprobs(self) -> list[int | None]:
        return [n for g in self.groups for n in g.logprobs]

    @property
    def want_logprobs(self) -> bool:
        """Some row's request asked for logprobs: only then does the step compute and transfer them."""
        return any(n is not None for n in self.logprobs)


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


def _empty_group(batch: int, length: int) -> Group:
    return Group(
        tokens=np.zeros((batch, length), np.int32),
        positions=np.full((batch, length), -1, np.int32),
        seq_ids=np.zeros((batch,), np.int32),
        sample=np.zeros((batch,), bool),
        output_index=np.zeros((batch,), np.int32),
        request_ids=[None] * batch,
        logprobs=[None] * batch,
    )


# The longest chunk a decode group shares a call with, by default: the smallest prefill bucket. Measured on the
# default model at float32, 2-core CPU (profiles/README.md): one decode row beside a 16-token chunk at 2,000 keys
# 82 ms as two calls, 67 ms as one. Each pair is one more program to compile (~5.6 s each there, twice a single
# group's), and a longer chunk's own compute dwarfs the second read of the weights.
PACK_CHUNKS_UP_TO = 16


def warm_up_calls(max_slots: int, buckets: tuple[int, ...], prompt_lengths=None,
                  pack_chunks_up_to: int = PACK_CHUNKS_UP_TO) -> list[Call]:
    """One all-padding call of each shape to compile (computes and writes nothing): every shape (the decode
    buckets, the prefill buckets, and each decode bucket beside each prefill bucket up to pack_chunks_up_to), or
    with prompt_lengths those that these prompts meet side by side without a prefix hit: the buckets of their whole
    chunks and the decode buckets up to one row per prompt, unpacked (a step whose budget splits a chunk further
    meets that chunk's shape on first use; a decode beside a chunk runs as two calls when their pair was not
    compiled)."""
    decodes, prefills = decode_buckets(max_slots), buckets
    if prompt_lengths is not None:
        lengths = list(prompt_lengths)
        top = _bucket(decodes, min(max(len(lengths), 1), max_slots))
        decodes = tuple(b for b in decodes if b <= top)
        chunk = buckets[-1]
        pieces = [c for n in lengths for c in (*[chunk] * (n // chunk), n % chunk) if c > 1]
        prefills = tuple(sorted({_bucket(buckets, c) for c in pieces}))
        pack_chunks_up_to = 0
    calls = [Call([_empty_group(b, 1)]) for b in decodes] + [Call([_empty_group(1, t)]) for t in prefills]
    calls += [Call([_empty_group(b, 1), _empty_group(1, t)]) for t in prefills if t <= pack_chunks_up_to
              for b in decodes]
    return calls


def _bucket(buckets: tuple[int, ...], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


def build(out: SchedulerOutput, *, max_slots: int, pages_per_seq: int, buckets: tuple[int, ...],
          packed: frozenset = frozenset()) -> StepInput:
    """packed: the call shapes ((B, 1), (1, T)) compiled for a decode group beside a chunk."""
    page_table = np.zeros((max_slots, pages_per_seq), np.int32)
    lengths = np.zeros((max_slots,), np.int32)
    for slot, pages in out.page_rows.items():
        page_table[slot, : len(pages)] = pages
        lengths[slot] = out.lengths[slot]

    singles = [c for c in out.chunks if len(c.token_ids) == 1]
    chunks = []
    for chunk in out.chunks:
        if len(chunk.token_ids) > 1:
            group = _empty_group(1, _bucket(buckets, len(chunk.token_ids)))
            _put(group, 0, chunk)
            chunks.append(group)
    calls = []
    if singles:  # first, with the first chunk whose pair with it was compiled, if any
        decode = _empty_group(_bucket(decode_buckets(max_slots), len(singles)), 1)
        for row, chunk in enumerate(singles):
            _put(decode, row, chunk)
        beside = next((i for i, c in enumerate(chunks) if (decode.shape, c.shape) in packed), None)
        calls.append(Call([decode] if beside is None else [decode, chunks.pop(beside)]))
    calls += [Call([c]) for c in chunks]
    num_tokens = out.num_tokens
    padded = sum(g.tokens.size for c in calls for g in c.groups) - num_tokens
    return StepInput(page_table, lengths, calls, out.slot_writes, out.new_pages, num_tokens, padded)


def _put(group: Group, row: int, chunk) -> None:
    n = len(chunk.token_ids)
    group.tokens[row, :n] = chunk.token_ids
    group.positions[row, :n] = np.arange(chunk.start, chunk.start + n)
    group.seq_ids[row] = chunk.slot
    group.sample[row] = chunk.sample
    group.output_index[row] = chunk.output_index
    group.request_ids[row] = chunk.request_id if chunk.sample else None
    group.logprobs[row] = chunk.logprobs if chunk.sample else None
