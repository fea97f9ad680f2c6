"""The engine: continuous batching over the paged KV cache (host side, plain Python; only runner.py imports jax).

    request.py       Request, RequestStatus, FinishReason, TokenLogprobs
    pages.py         PagePool: reference counts, the null page, the free queue in LRU order
    prefix_cache.py  the hash chain over full pages
    scheduler.py     schedule() -> SchedulerOutput; update(StepResult)
    batch.py         SchedulerOutput -> StepInput (numpy, bucketed to the compiled shapes)
    runner.py        the compiled steps and the donated device cache
    engine.py        Engine: add_request / step / abort / generate / metrics
    async_engine.py  AsyncEngine: the step loop on a thread, async streams
"""

from jaxinfer.engine.request import TokenLogprobs

__all__ = ["TokenLogprobs"]
