"""The engine's host side, exactly: page ids, refcounts, the free queue, the token split, preemption, abort.

No jax here: a fake device samples token 1000 + output index, so every test runs in milliseconds."""

from __future__ import annotations

import pytest

from jaxinfer.engine.pages import PagePool
from jaxinfer.engine.prefix_cache import PrefixCache, page_hash
from jaxinfer.engine.request import FinishReason, Request, RequestStatus
from jaxinfer.engine.scheduler import Scheduler, StepResult
from jaxinfer.sampling_params import SamplingParams

PS = 4  # page size


def make_scheduler(num_pages=64, max_slots=4, budget=64, chunk=64, prefix_caching=True, max_pages=32):
    return Scheduler(
        max_slots=max_slots, max_tokens_per_step=budget, prefill_chunk=chunk, page_size=PS, num_pages=num_pages,
        max_pages_per_request=max_pages, prefix_caching=prefix_caching,
    )


def make_request(rid, prompt, max_new_tokens=8, priority=0, stop_token_ids=()):
    prompt = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    return Request(rid, prompt, max_new_tokens, SamplingParams(temperature=0.0), priority=priority,
                   stop_token_ids=frozenset(stop_token_ids))


def step(scheduler):
    """One schedule + fake device step + update -> the SchedulerOutput."""
    out = scheduler.schedule()
    sampled = {c.request_id: 1000 + c.output_index for c in out.chunks if c.sample}
    stopped = frozenset(r for r, t in sampled.items() if t in scheduler.requests[r].stop_token_ids)
    scheduler.update(out, StepResult(sampled, stopped))
    return out


def split(out):
    return [(c.request_id, len(c.token_ids)) for c in out.chunks]


# ------------------------------------------------------------------------------------ pages and prefix cache


def test_pool_hands_out_low_pages_first_and_never_the_null_page():
    pool = PagePool(5)
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(3) is None, "all or nothing"
    assert pool.num_free == 2 and pool.allocate(2) == [3, 4]
    assert pool.allocate(1) is None


def test_pool_release_puts_empty_pages_first_and_cached_pages_last_tail_first():
    cache = PrefixCache(PS)
    pool = PagePool(8, cache)
    pages = pool.allocate(4)  # [1, 2, 3, 4]
    for i, page in enumerate(pages[:3]):  # pages 1-3 full and cached, page 4 partial
        cache.insert(page, bytes([i + 1]), bytes([i]) if i else b"", [i] * PS)
    pool.release(pages)
    # empty pages (4 and the never-used 5-7) first; then the cached ones, the request's tail before its head
    assert pool.free_order() == [4, 5, 6, 7, 3, 2, 1]
    assert pool.num_cached_free == 3
    assert pool.allocate(5) == [4, 5, 6, 7, 3]
    assert not cache.holds(3) and cache.holds(2), "handing out a cached page evicts it from the cache"


def test_prefix_cache_compares_parent_and_tokens_on_a_hit():
    cache = PrefixCache(PS)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    h0 = page_hash(b"", a)
    h1 = page_hash(h0, b)
    cache.insert(7, h0, b"", a)
    cache.insert(9, h1, h0, b)
    assert cache.lookup([h0, h1], a + b, 2) == [7, 9]
    assert cache.lookup([h0, h1], a + b, 1) == [7]
    # A forged key (as if the hash collided) with other tokens is not a hit.
    assert cache.lookup([h0, h1], a + [5, 6, 7, 9], 2) == [7]
    assert not cache.insert(11, h1, h0, b), "the first copy of a prefix stays"


# ------------------------------------------------------------------------------------ the prefix cache in the scheduler


def test_two_requests_share_a_cached_prefix_with_refcounts_and_free_order():
    s = make_scheduler(num_pages=16)
    system = list(range(100, 108))  # two full pages
    s.add(make_request(0, system + [1, 2, 3], max_new_tokens=3))
    out = step(s)
    assert s.requests[0].pages == [1, 2, 3]  # 11 tokens -> 3 pages
    assert out.new_pages == [1, 2, 3]
    # Request 1 arrives while 0 runs: its first two pages are 0's, its own tail is new.
    s.add(make_request(1, system + [7, 7, 7, 7, 7], max_new_tokens=1))
    out = step(s)
    r1 = s.requests.get(1)
    assert r1 is None or r1.is_finished  # 1 token: done in its first step
    assert out.slot_writes[0].request_id == 1
    assert split(out) == [(0, 1), (1, 5)], "0 decodes; 1 computes only the 5 tokens past the shared pages"
    assert s.counters["prefix_hit_tokens"] == 8 and s.counters["prefix_queried_tokens"] == 11 + 13
    # While both ran pages 1 and 2 had two holders; request 1 finished at once, so they are back to one.
    assert [s.pool.refcount[p] for p in (1, 2, 3)] == [1, 1, 1]
    # Request 1's pages went back: its full page (4: tokens 8..11) stays cached, its partial page (5) is empty.
    assert s.pool.free_order()[0] == 5 and s.pool.free_order()[-1] == 4
    out = step(s)  # request 0's third token: done
    assert out.new_pages == [5], "its 13th position needs a page: the empty one first"
    assert not s.has_unfinished()
    # Request 0's pages: page 3 held 11 tokens + its first output (full, cached), page 4 was request 1's.
    order = s.pool.free_order()
    assert order[-4:] == [4, 3, 2, 1], "cached pages: tail first, the shared system prefix last"
    assert s.pool.num_cached_free == 4


def test_refcounts_while_two_requests_share_a_prefix():
    s = make_scheduler(num_pages=32)
    system = list(range(100, 112))  # three full pages
    s.add(make_request(0, system + [1], max_new_tokens=4))
    step(s)
    s.add(make_request(1, system + [2], max_new_tokens=4))
    step(s)
    r0, r1 = s.requests[0], s.requests[1]
    assert r0.pages[:3] == r1.pages[:3] == [1, 2, 3] and r0.pages[3] != r1.pages[3]
    assert [s.pool.refcount[p] for p in r0.pages[:3]] == [2, 2, 2]
    assert r1.num_cached_tokens == 12
    s.finish(r0, FinishReason.ABORT)
    assert [s.pool.refcount[p] for p in (1, 2, 3)] == [1, 1, 1]
    assert not any(s.pool.is_free(p) for p in (1, 2, 3))


def test_a_whole_prompt_hit_recomputes_the_last_page():
    s = make_scheduler()
    s.add(make_request(0, 8, max_new_tokens=1))  # two full pages
    step(s)
    s.add(make_request(1, 8, max_new_tokens=1))
    out = step(s)
    # Only the first page is reused: the last token's page is computed afresh, never written while shared.
    assert split(out) == [(1, 4)] and out.chunks[0].start == 4
    assert s.counters["prefix_hit_tokens"] == 4


def test_prefix_caching_off_reuses_nothing():
    s = make_scheduler(prefix_caching=False)
    s.add(make_request(0, 8, max_new_tokens=1))
    step(s)
    s.add(make_request(1, 8, max_new_tokens=1))
    out = step(s)
    assert split(out) == [(1, 8)]
    assert s.pool.num_cached_free == 0 and s.counters["prefix_hit_tokens"] == 0


# ------------------------------------------------------------------------------------ the token budget


def test_three_800_token_prompts_under_a_budget_of_1024():
    s = make_scheduler(num_pages=1024, budget=1024, chunk=1024, max_pages=256)
    for rid in range(3):
        s.add(make_request(rid, [rid + 1] * 800, max_new_tokens=4))
    assert split(step(s)) == [(0, 800), (1, 224)]
    assert split(step(s)) == [(0, 1), (1, 576), (2, 447)]
    assert split(step(s)) == [(0, 1), (1, 1), (2, 353)]
    assert split(step(s)) == [(0, 1), (1, 1), (2, 1)]


def test_prefill_chunk_caps_each_request():
    s = make_scheduler(budget=64, chunk=16)
    s.add(make_request(0, 40))
    s.add(make_request(1, 10))
    assert split(step(s)) == [(0, 16), (1, 10)]
    assert split(step(s)) == [(0, 16), (1, 1)]
    out = step(s)
    assert split(out) == [(0, 8), (1, 1)] and out.chunks[0].sample


def test_slots_bound_admission():
    s = make_scheduler(max_slots=2)
    for rid in range(3):
        s.add(make_request(rid, 4))
    out = step(s)
    assert split(out) == [(0, 4), (1, 4)] and [w.slot for w in out.slot_writes] == [0, 1]
    assert [r.request_id for r in s.waiting] == [2]


def test_priority_orders_the_queue_then_fcfs():
    s = make_scheduler(max_slots=1)
    s.add(make_request(0, 4, max_new_tokens=1, priority=5))
    s.add(make_request(1, 4, max_new_tokens=1, priority=0))
    s.add(make_request(2, 4, max_new_tokens=1, priority=0))
    assert [split(step(s))[0][0] for _ in range(3)] == [1, 2, 0]


# ------------------------------------------------------------------------------------ preemption


def test_the_request_admitted_last_is_preempted_and_requeued_first():
    # 6 usable pages of 4 tokens; three requests of 4-token prompts growing to 12 tokens each: 9 pages needed.
    s = make_scheduler(num_pages=7, max_slots=3, prefix_caching=False)
    for rid in range(3):
        s.add(make_request(rid, 4, max_new_tokens=8))
    s.add(make_request(3, 4, max_new_tokens=1))
    step(s)  # three prompts admitted: pages 1, 2, 3
    preempted = []
    for _ in range(12):
        out = step(s)
        preempted += out.preempted
        if preempted:
            break
    assert preempted == [2], "the newest admission goes first"
    r2 = s.requests[2]
    assert r2.status is RequestStatus.PREEMPTED and r2.pages == [] and r2.num_computed_tokens == 0
    assert [r.request_id for r in s.waiting] == [2, 3], "back at the head of the queue, before later arrivals"
    # It resumes by recomputing prompt + output so far, and finishes with all its tokens.
    while s.has_unfinished():
        step(s)
    assert r2.output_token_ids == [1000 + i for i in range(8)]
    assert s.counters["preemptions"] >= 1


def test_a_request_preempts_itself_when_it_is_the_newest():
    s = make_scheduler(num_pages=4, max_slots=2, prefix_caching=False)  # 3 usable pages
    s.add(make_request(0, 4, max_new_tokens=8))  # grows to 3 pages
    s.add(make_request(1, 4, max_new_tokens=8))
    for _ in range(20):
        step(s)
        if s.counters["preemptions"]:
            break
    assert s.requests[1].status is RequestStatus.PREEMPTED
    while s.has_unfinished():
        step(s)


# ------------------------------------------------------------------------------------ stops and abort


def test_stop_token_and_length_finish_reasons():
    s = make_scheduler()
    a = make_request(0, 4, max_new_tokens=8, stop_token_ids=[1002])
    b = make_request(1, 4, max_new_tokens=2)
    s.add(a)
    s.add(b)
    while s.has_unfinished():
        step(s)
    assert a.output_token_ids == [1000, 1001, 1002] and a.finish_reason is FinishReason.STOP
    assert b.output_token_ids == [1000, 1001] and b.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("state", ["waiting", "running", "prefilling", "preempted"])
def test_abort_from_each_state_frees_everything(state):
    s = make_scheduler(num_pages=7, max_slots=3, budget=8, chunk=8, prefix_caching=False)
    victim = make_request(9, 20 if state == "prefilling" else 4, max_new_tokens=8)
    if state == "preempted":
        for rid in range(2):
            s.add(make_request(rid, 4, max_new_tokens=8))
    s.add(victim)
    if state != "waiting":
        step(s)
    if state == "preempted":
        while victim.status is not RequestStatus.PREEMPTED:
            step(s)
    assert victim.status.value == {"prefilling": "running"}.get(state, state)
    s.finish(victim, FinishReason.ABORT)
    assert victim.is_finished and victim.finish_reason is FinishReason.ABORT and 9 not in s.requests
    assert victim not in s.waiting and victim not in s.running and victim.pages == []
    while s.has_unfinished():
        step(s)
    assert s.pool.num_free == s.pool.num_usable


def test_token_ids_spans_prompt_and_output():
    r = make_request(0, [1, 2, 3])
    r.output_token_ids = [7, 8]
    assert r.token_ids(0, 5) == [1, 2, 3, 7, 8]
    assert r.token_ids(2, 4) == [3, 7] and r.token_ids(3, 5) == [7, 8] and r.token_ids(0, 2) == [1, 2]


def test_batch_packs_one_token_chunks_into_a_decode_bucket_and_pads_prefill_chunks():
    from jaxinfer.engine import batch

    s = make_scheduler(max_slots=8, budget=64, chunk=20)
    for rid in range(3):
        s.add(make_request(rid, 4))
    step(s)  # three prompts: now each decodes
    s.add(make_request(3, range(50, 68)))
    out = s.schedule()
    assert split(out) == [(0, 1), (1, 1), (2, 1), (3, 18)]
    built = batch.build(out, max_slots=8, pages_per_seq=32, buckets=batch.prefill_buckets(20))
    assert batch.prefill_buckets(20) == (16, 20) and batch.decode_buckets(8) == (1, 2, 4, 8)
    assert [c.shape for c in built.calls] == [((4, 1),), ((1, 20),)]  # no pair compiled: two calls
    (decode,), (prefill,) = (c.groups for c in built.calls)
    assert decode.seq_ids.tolist() == [0, 1, 2, 0] and decode.positions[:, 0].tolist() == [4, 4, 4, -1]
    assert decode.request_ids == [0, 1, 2, None] and decode.output_index.tolist() == [1, 1, 1, 0]
    assert prefill.seq_ids.tolist() == [3] and prefill.positions[0].tolist() == list(range(18)) + [-1, -1]
    assert built.num_tokens == 21 and built.num_padded_tokens == 1 + 2
    assert built.page_table[3, :6].tolist() == s.requests[3].pages + [0] and built.lengths.tolist()[:4] == [4, 4, 4, 0]
    # Where the pair was compiled, the decode group and the chunk share one call (one forward), decodes first.
    packed = batch.build(out, max_slots=8, pages_per_seq=32, buckets=batch.prefill_buckets(20),
                         packed=frozenset({((4, 1), (1, 20))}))
    assert [c.shape for c in packed.calls] == [((4, 1), (1, 20))]
    assert packed.calls[0].request_ids == [0, 1, 2, None, 3] and packed.num_padded_tokens == built.num_padded_tokens
    other_pair = batch.build(out, max_slots=8, pages_per_seq=32, buckets=batch.prefill_buckets(20),
                             packed=frozenset({((8, 1), (1, 20)), ((4, 1), (1, 16))}))
    assert [c.shape for c in other_pair.calls] == [((4, 1),), ((1, 20),)]


def test_warm_up_for_prompt_lengths_covers_their_chunks_and_decode_rows():
    from jaxinfer.engine import batch

    def shapes(lengths, max_slots=8, chunk=64, pack=0):
        calls = batch.warm_up_calls(max_slots, batch.prefill_buckets(chunk), lengths, pack_chunks_up_to=pack)
        assert all(len(c.groups) == 1 for c in calls) or lengths is None
        return [c.shape[0] if len(c.groups) == 1 else c.shape for c in calls]

    assert batch.prefill_buckets(64) == (16, 32, 64)
    every = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 16), (1, 32), (1, 64)]
    assert shapes(None) == every
    # Packing chunks of up to 32 tokens: every decode bucket beside each of the prefill buckets 16 and 32.
    pairs = [((b, 1), (1, t)) for t in (16, 32) for b in (1, 2, 4, 8)]
    assert shapes(None, pack=32) == every + pairs and shapes([150, 5, 1], pack=32) == shapes([150, 5, 1])
    # 150 = 64 + 64 + 22: buckets 64 and 32; 3 prompts decode in a batch of up to 4 rows.
    assert shapes([150, 5, 1]) == [(1, 1), (2, 1), (4, 1), (1, 16), (1, 32), (1, 64)]
    # A last chunk of one token goes into the decode call (65 = 64 + 1); no prompt: decode alone.
    assert shapes([65]) == [(1, 1), (1, 64)] and shapes([]) == [(1, 1)]
    assert shapes([20] * 30, max_slots=6) == [(1, 1), (2, 1), (4, 1), (6, 1), (1, 32)]
