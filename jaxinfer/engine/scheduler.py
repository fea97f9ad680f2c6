"""The scheduler: which requests compute how many tokens this step, and with which pages.

No prefill or decode phase. Every step spends one token budget: running requests first, in priority then
admission order (a decode token each, or the next chunk of a long prompt), then waiting ones while budget, slots
and pages last. When a running request needs a page and none is free, the running request admitted last (the
lowest priority, then the newest) is preempted by recompute: its pages are released (the full ones stay in the
prefix cache) and it goes back to the waiting queue, where it sorts first among its priority. Plain Python: the
device sees only the SchedulerOutput, never a Request.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq

from jaxinfer.engine.pages import NULL_PAGE, PagePool
from jaxinfer.engine.prefix_cache import PrefixCache, page_hash
from jaxinfer.engine.request import FinishReason, Request, RequestStatus, TokenLogprobs
from jaxinfer.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + len(token_ids)) of one request; sample its next token if they end it."""

    request_id: int
    slot: int
    start: int  # the request's num_computed_tokens before this step: the position of token_ids[0]
    token_ids: tuple[int, ...]
    sample: bool  # start + len(token_ids) == num_tokens: the step samples output token `output_index`
    output_index: int  # index of the sampled token in the request's output: its sampling key
    logprobs: int | None = None  # the request's: top alternatives to report with the sampled token (None: none)


@dataclasses.dataclass(frozen=True)
class SlotWrite:
    """A request (re)admitted into a slot: the device row's sampling settings and repetition-penalty tokens."""

    slot: int
    request_id: int
    sampling: SamplingParams
    seed: int
    stop_token_ids: tuple[int, ...]
    seen_token_ids: tuple[int, ...]  # prompt and output so far


@dataclasses.dataclass
class SchedulerOutput:
    step: int
    chunks: list[ScheduledChunk]  # running requests first, then the newly admitted
    slot_writes: list[SlotWrite]
    page_rows: dict[int, tuple[int, ...]]  # slot -> pages of every running request
    lengths: dict[int, int]  # slot -> tokens already in the cache, every running request
    new_pages: list[int]  # handed out this step for new tokens (a test mode poisons them)
    preempted: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclasses.dataclass
class StepResult:
    sampled: dict[int, int]  # request_id -> the token its chunk sampled
    stopped: frozenset[int] = frozenset()  # request_ids whose token is one of their stop ids (checked on device)
    logprobs: dict[int, TokenLogprobs] = dataclasses.field(default_factory=dict)  # request_id -> its token's, if asked


def _priority_then_id(request: Request):
    return (request.priority, request.request_id)


def _priority_then_admission(request: Request):
    return (request.priority, request.admitted_order)


class Scheduler:
    def __init__(
        self,
        *,
        max_slots: int,
        max_tokens_per_step: int,
        prefill_chunk: int,
        page_size: int,
        num_pages: int,
        max_pages_per_request: int,
        prefix_caching: bool = True,
        check_invariants: bool = True,
    ):
        self.max_slots = max_slots
        self.max_tokens_per_step = max_tokens_per_step
        self.prefill_chunk = prefill_chunk
        self.page_size = page_size
        self.max_pages_per_request = max_pages_per_request
        self.prefix_cache = PrefixCache(page_size) if prefix_caching else None
        self.pool = PagePool(num_pages, self.prefix_cache)
        self.check_invariants = check_invariants
        self.requests: dict[int, Request] = {}  # every unfinished request
        self.waiting: list[Request] = []  # sorted by (priority, request_id): FCFS among equals
        self.running: list[Request] = []  # sorted by (priority, admitted_order): the last is preempted first
        self._free_slots = list(range(max_slots))  # a heap: the lowest free slot first
        self._step = 0
        self._admissions = 0
        self.counters = collections.Counter()  # prefix_queried_tokens, prefix_hit_tokens, preemptions, ...

    # -------------------------------------------------------------------------------- requests in and out

    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_priority_then_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request in any state: its pages and slot are free at once."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        else:
            return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def _release(self, request: Request) -> None:
        self.pool.release(request.pages)
        request.pages = []
        request.num_registered_pages = 0
        heapq.heappush(self._free_slots, request.slot)
        request.slot = None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.counters["preemptions"] += 1
        bisect.insort(self.waiting, request, key=_priority_then_id)

    # -------------------------------------------------------------------------------- one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self._step, [], [], {}, {}, [], [])
        self._step += 1
        budget = self._schedule_running(self.max_tokens_per_step, out)
        if not out.preempted:  # pages ran short this step: admit nobody until they are back
            self._schedule_waiting(budget, out)
        for request in self.running:
            out.page_rows[request.slot] = tuple(request.pages)
            out.lengths[request.slot] = request.num_computed_tokens
        if self.check_invariants:
            self._check(out)
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, self.prefill_chunk, budget)
            while not self._grow(request, request.num_computed_tokens + n, out):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it was the last running request: nothing after it is left
            out.chunks.append(self._chunk(request, n))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, budget: int, out: SchedulerOutput) -> int:
        ps = self.page_size
        while self.waiting and budget > 0 and self._free_slots:
            request = self.waiting[0]
            hit = self._prefix_hit(request)
            computed = len(hit) * ps
            n = min(request.num_tokens - computed, self.prefill_chunk, budget)
            need = -(-(computed + n) // ps) - len(hit)
            claimable = self.pool.num_free - sum(1 for page in hit if self.pool.is_free(page))
            if need > claimable:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            self.pool.share(hit)
            new = self.pool.allocate(need)
            out.new_pages.extend(new)
            request.pages = hit + new
            request.num_computed_tokens = request.num_cached_tokens = computed
            request.num_registered_pages = len(hit)
            request.slot = heapq.heappop(self._free_slots)
            request.status = RequestStatus.RUNNING
            request.admitted_order = self._admissions
            self._admissions += 1
            bisect.insort(self.running, request, key=_priority_then_admission)
            if self.prefix_cache is not None:
                self.counters["prefix_queried_tokens"] += request.num_tokens
                self.counters["prefix_hit_tokens"] += computed
            out.slot_writes.append(
                SlotWrite(
                    request.slot, request.request_id, request.sampling, request.seed,
                    tuple(sorted(request.stop_token_ids)), tuple(request.token_ids(0, request.num_tokens)),
                )
            )
            out.chunks.append(self._chunk(request, n))
            budget -= n
        return budget

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request.request_id, request.slot, start, tuple(request.token_ids(start, start + n)),
            sample=start + n == request.num_tokens, output_index=len(request.output_token_ids),
            logprobs=request.logprobs,
        )

    def _grow(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Pages to hold num_tokens positions, all or none."""
        need = -(-num_tokens // self.page_size) - len(request.pages)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        request.pages.extend(new)
        out.new_pages.extend(new)
        return True

    # -------------------------------------------------------------------------------- the prefix cache

    def _hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """The request's hash chain over at least its first num_pages full pages (computed once, kept)."""
        hashes, ps = request.page_hashes, self.page_size
        for i in range(len(hashes), num_pages):
            hashes.append(page_hash(hashes[i - 1] if i else b"", request.token_ids(i * ps, (i + 1) * ps)))
        return hashes

    def _prefix_hit(self, request: Request) -> list[int]:
        """Cached pages of the request's longest cached prefix. At most num_tokens - 1 tokens: the last token is
        always computed (its logits give the next token), so a hit never covers the page it would write into."""
        if self.prefix_cache is None:
            return []
        max_pages = (request.num_tokens - 1) // self.page_size
        hashes = self._hashes(request, max_pages)
        return self.prefix_cache.lookup(hashes, request.token_ids(0, max_pages * self.page_size), max_pages)

    def _register_full_pages(self, request: Request) -> None:
        """Offer the request's newly computed full pages to the prefix cache."""
        if self.prefix_cache is None:
            return
        ps = self.page_size
        full = request.num_computed_tokens // ps
        hashes = self._hashes(request, full)
        for i in range(request.num_registered_pages, full):
            parent = hashes[i - 1] if i else b""
            self.prefix_cache.insert(request.pages[i], hashes[i], parent, request.token_ids(i * ps, (i + 1) * ps))
        request.num_registered_pages = max(request.num_registered_pages, full)

    # -------------------------------------------------------------------------------- after the device step

    def update(self, out: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance each scheduled request by its chunk, append sampled tokens, end those at a stop token or their
        limit. -> the requests that got a token (finished ones included)."""
        advanced = []
        for chunk in out.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted since the schedule
            request.num_computed_tokens += len(chunk.token_ids)
            self._register_full_pages(request)
            if not chunk.sample:
                continue
            request.output_token_ids.append(result.sampled[chunk.request_id])
            advanced.append(request)
            if chunk.request_id in result.stopped:
                self.finish(request, FinishReason.STOP)
            elif len(request.output_token_ids) >= request.max_new_tokens:
                self.finish(request, FinishReason.LENGTH)
        return advanced

    # -------------------------------------------------------------------------------- invariants

    def _check(self, out: SchedulerOutput) -> None:
        assert out.num_tokens <= self.max_tokens_per_step, (out.num_tokens, self.max_tokens_per_step)
        assert len(self.running) <= self.max_slots
        slots = [r.slot for r in self.running]
        assert len(set(slots)) == len(slots) and set(slots).isdisjoint(self._free_slots), slots
        assert len(slots) + len(self._free_slots) == self.max_slots
        holders = collections.Counter(page for r in self.running for page in r.pages)
        assert NULL_PAGE not in holders
        for page in range(1, self.pool.num_pages):
            assert self.pool.refcount[page] == holders[page], (page, self.pool.refcount[page], holders[page])
            assert (holders[page] == 0) == self.pool.is_free(page), page
            # Two requests share a page only through the prefix cache (never a partial page).
            assert holders[page] <= 1 or (self.prefix_cache is not None and self.prefix_cache.holds(page)), page
        for request in self.running:
            assert len(request.pages) <= self.max_pages_per_request
            assert request.status is RequestStatus.RUNNING
        for request in self.waiting:
            assert not request.pages and request.slot is None and request.num_computed_tokens == 0
        for chunk in out.chunks:
            request = self.requests[chunk.request_id]
            assert len(request.pages) * self.page_size >= chunk.start + len(chunk.token_ids)
            assert len({page for page in request.pages}) == len(request.pages)
