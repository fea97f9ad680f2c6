"""A property test of the scheduler: random arrivals, aborts, lengths and pool sizes (hypothesis), host only."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.engine.request import FinishReason, Request
from jaxinfer.engine.scheduler import Scheduler, StepResult
from jaxinfer.sampling_params import SamplingParams

PS = 4

request_st = st.tuples(
    st.integers(0, 12),  # arrival step
    st.integers(0, 2),  # which shared prefix (0: none)
    st.integers(1, 30),  # own prompt tokens
    st.integers(1, 12),  # max_new_tokens
    st.one_of(st.none(), st.integers(0, 20)),  # abort at this step (maybe)
    st.integers(0, 1),  # priority
)


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(request_st, min_size=1, max_size=12),
    num_pages=st.integers(12, 40),
    max_slots=st.integers(1, 5),
    budget=st.integers(1, 40),
    chunk=st.integers(1, 40),
    prefix_caching=st.booleans(),
)
def test_random_traffic_keeps_the_invariants_and_drains(requests, num_pages, max_slots, budget, chunk, prefix_caching):
    max_len = 42  # prompt (<= 8 + 30) + output fits 11 pages: every request fits the pool alone
    s = Scheduler(
        max_slots=max_slots, max_tokens_per_step=budget, prefill_chunk=chunk, page_size=PS, num_pages=num_pages,
        max_pages_per_request=-(-max_len // PS), prefix_caching=prefix_caching,
    )
    prefixes = {0: [], 1: [7] * 8, 2: list(range(50, 58))}
    arrivals = collections.defaultdict(list)
    made = []
    for rid, (arrive, prefix, own, max_new, abort_at, priority) in enumerate(requests):
        prompt = prefixes[prefix] + [(rid * 31 + i) % 97 + 100 for i in range(own)]
        max_new = min(max_new, max_len - len(prompt))
        r = Request(rid, prompt, max_new, SamplingParams(temperature=0.0), priority=priority)
        arrivals[arrive].append(r)
        made.append((r, abort_at))
    step_limit = 2000  # far above any legitimate drain: a request waiting forever fails here
    for step in range(step_limit):
        for r in arrivals.pop(step, []):
            s.add(r)
        for r, abort_at in made:
            if abort_at == step and not r.is_finished and r.request_id in s.requests:
                s.finish(r, FinishReason.ABORT)
        if not s.has_unfinished() and not arrivals:
            break
        out = s.schedule()  # checks the invariants before it returns
        assert out.num_tokens <= budget
        if s.running and not out.chunks:
            raise AssertionError("running requests but nothing scheduled: no progress")
        sampled = {c.request_id: 1000 + c.output_index for c in out.chunks if c.sample}
        s.update(out, StepResult(sampled))
        held = collections.Counter(p for r in s.running for p in r.pages)
        for page, holders in held.items():
            assert s.pool.refcount[page] == holders
            if holders > 1:
                assert s.prefix_cache is not None and s.prefix_cache.holds(page)
    else:
        raise AssertionError(f"not drained after {step_limit} steps")
    assert not s.running and not s.waiting
    assert s.pool.num_free == s.pool.num_usable, "every page free or cached"
    assert all(c == 0 for c in s.pool.refcount)
    for r, _ in made:
        assert r.is_finished
        if r.finish_reason is not FinishReason.ABORT:
            # Preemption and prefix hits never change what a request produces.
            assert r.output_token_ids == [1000 + i for i in range(r.max_new_tokens)]
