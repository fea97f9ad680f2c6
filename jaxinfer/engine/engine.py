"""Engine: continuous batching over the paged KV cache.

    engine = jaxinfer.Engine(model, max_slots=16)
    rid = engine.add_request("Hello", sampling=jaxinfer.SamplingParams(temperature=0), max_new_tokens=64)
    while engine.has_unfinished():
        for out in engine.step():     # RequestOutput: request_id, new_token_ids, text (delta), finish_reason,
            ...                       # logprobs (with add_request(..., logprobs=n))

Requests come and go between steps; each step schedules (scheduler.py), builds fixed-shape arrays (batch.py),
runs the compiled programs (runner.py), then appends tokens, detokenizes and checks stop strings here. A request's
tokens depend only on its own prompt, sampling settings and seed: they equal `jaxinfer.generate([prompt],
seed=seed)`'s whatever runs beside it.

add_request(..., logprobs=n) reports each output token's logprob and its n most likely alternatives (n in
[0, MAX_LOGPROBS]) in RequestOutput.logprobs, from log_softmax of the raw logits (before temperature, penalties and
filters); the device computes them only in the calls where some request asked.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import time
from collections.abc import Sequence

from jaxinfer.engine import batch as batch_lib
from jaxinfer.engine.request import FinishReason, Request, TokenLogprobs
from jaxinfer.engine.runner import MAX_LOGPROBS, Runner
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.errors import ParameterError, is_int
from jaxinfer.generate import (
    DEFAULT_PAGE_SIZE, DEFAULT_PREFILL_CHUNK, GenerationOutput, check_attention_backend, check_count, check_token_ids,
    per_prompt,
)
from jaxinfer.sampling_params import SamplingParams, check_seed

STOP_WIDTH = 16  # stop token ids per request on the device (the model's EOS ids included)
DEFAULT_CONTEXT_PER_SLOT = 2048  # the default pool: every slot can hold this many tokens at once
CHECK_INVARIANTS_ENV = "JAXINFER_CHECK_INVARIANTS"  # "1": every engine checks the scheduler's invariants (the tests)


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    new_token_ids: list[int]
    text: str | None  # the text these tokens completed (None without a tokenizer); a stop string is cut off
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    logprobs: list[TokenLogprobs] | None = None  # one per new token, if the request asked for logprobs


class Histogram:
    """Counts of observations at or below each bound (Prometheus' cumulative buckets), with sum and count."""

    BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, total = {}, 0
        for bound, n in zip((*self.BOUNDS, float("inf")), self.counts):
            total += n
            cumulative[bound] = total
        return {"buckets": cumulative, "sum": self.sum, "count": self.count,
                "mean": self.sum / self.count if self.count else None}


class _Text:
    """One request's incremental detokenization and stop strings: text is handed out only once no stop string
    can still begin in it (the last len(longest stop) - 1 characters are held back)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.searched = 0

    def feed(self, token_id: int, final: bool) -> tuple[str, bool]:
        """-> (the new text, whether a stop string ended it)."""
        self.text += self.decoder.feed(token_id)
        if final:
            self.text += self.decoder.flush()
        stopped = False
        if self.stop:
            start = max(0, self.searched - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            self.searched = len(self.text)
            if found:
                self.text = self.text[: min(found)]
                stopped = final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece, stopped


class Engine:
    def __init__(
        self,
        model,
        max_slots: int = 16,
        num_pages: int | None = None,
        max_tokens_per_step: int = 512,
        prefix_caching: bool = True,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        prefill_chunk: int | None = None,
        max_model_len: int | None = None,
        attention_backend: str | None = None,
        poison_new_pages: bool = False,
        check_invariants: bool | None = None,
        warm_up: bool = True,
        pack_chunks_up_to: int = batch_lib.PACK_CHUNKS_UP_TO,
    ):
        """num_pages: the pool's pages of page_size tokens (page 0 is the null page); None: every slot can hold
        DEFAULT_CONTEXT_PER_SLOT tokens at once, and one request a whole context. The pool is stored as the model's
        kv_cache_dtype (jaxinfer.load_model(..., kv_cache_dtype="int8" | "fp8")): the default pool then holds the same
        pages in about a quarter of float32's bytes (int8: 1 + 4 / head_dim bytes per element with its scales, fp8:
        1, float32: 4; metrics()["kv_cache_bytes"]). For about four times the pages in float32's bytes instead, pass
        num_pages = 4 * metrics()["kv_pages_total"] of a default engine (jaxinfer.kv_cache.bytes_per_token sizes a
        pool from a byte budget).

        check_invariants: after each schedule, assert the scheduler's invariants (every page's count against its
        holders: host work that grows with the pool, ~1.5 ms a step at the default 2,049 pages). None: only where
        $JAXINFER_CHECK_INVARIANTS is 1, as the tests set it.

        warm_up: compile every step program now (a server's choice: no request ever waits for a compile);
        False compiles each on first use, or when `warm_up(prompt_lengths)` is called (a one-shot command's: it
        pays only for the shapes it meets, before its first token).

        pack_chunks_up_to: a step's decodes and a prompt chunk of up to this many tokens run as one forward (one
        read of the weights) once the full warm-up has compiled that pair of shapes (one program per decode
        bucket and prefill bucket up to it); 0: never, each is its own call."""
        cfg = model.cfg
        max_slots = check_count("max_slots", max_slots, 4096)
        max_tokens_per_step = check_count("max_tokens_per_step", max_tokens_per_step)
        page_size = check_count("page_size", page_size, 4096)
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_tokens_per_step) if prefill_chunk is None else prefill_chunk
        prefill_chunk = check_count("prefill_chunk", prefill_chunk, max_tokens_per_step)
        max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
        max_model_len = check_count("max_model_len", max_model_len, cfg.max_position_embeddings)
        if not (is_int(pack_chunks_up_to) and pack_chunks_up_to >= 0):
            raise ParameterError("pack_chunks_up_to", "must be an int >= 0", value=pack_chunks_up_to)
        if check_invariants is None:
            check_invariants = os.environ.get(CHECK_INVARIANTS_ENV) == "1"
        if not isinstance(prefix_caching, bool):
            raise ParameterError("prefix_caching", "must be True or False", value=prefix_caching)
        check_attention_backend(attention_backend, model.kv_cache_dtype)
        pages_per_seq = -(-max_model_len // page_size)
        if num_pages is None:  # every slot DEFAULT_CONTEXT_PER_SLOT tokens at once, and one request a whole context
            per_slot = -(-min(max_model_len, DEFAULT_CONTEXT_PER_SLOT) // page_size)
            num_pages = 1 + max(max_slots * per_slot, pages_per_seq)
        num_pages = check_count("num_pages", num_pages)
        if num_pages < 2:
            raise ParameterError("num_pages", "must be >= 2 (page 0 is the null page)", value=num_pages)

        self.model = model
        self.tokenizer = model.tokenizer
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.max_slots = max_slots
        self.buckets = batch_lib.prefill_buckets(prefill_chunk)
        self.scheduler = Scheduler(
            max_slots=max_slots, max_tokens_per_step=max_tokens_per_step, prefill_chunk=prefill_chunk,
            page_size=page_size, num_pages=num_pages, max_pages_per_request=pages_per_seq,
            prefix_caching=prefix_caching, check_invariants=check_invariants,
        )
        self.runner = Runner(
            model, max_slots=max_slots, num_pages=num_pages, page_size=page_size, pages_per_seq=pages_per_seq,
            buckets=self.buckets, stop_width=STOP_WIDTH, attention_backend=attention_backend,
            poison_new_pages=poison_new_pages, pack_chunks_up_to=pack_chunks_up_to,
        )
        if warm_up:
            self.warm_up()
        self._ids = itertools.count()  # next() is atomic: AsyncEngine numbers requests on its callers' threads
        self._texts: dict[int, _Text] = {}
        self._arrival: dict[int, float] = {}
        self._last_token_at: dict[int, float] = {}
        self._pending: list[RequestOutput] = []  # aborts, reported by the next step
        self._ttft = Histogram()
        self._itl = Histogram()
        self._steps = 0
        self._padded_tokens = 0
        self._computed_tokens = 0
        self._packed_calls = 0

    def warm_up(self, prompt_lengths=None) -> float:
        """Compile step programs now -> seconds spent: every shape (None), or those that prompts of these lengths
        meet side by side (their prefill chunks' buckets, decode up to one row each): what a one-shot command
        calls before its first token, so its TTFT and token rate are not a compile's."""
        if prompt_lengths is not None:
            prompt_lengths = [check_count("prompt_lengths", n, self.max_model_len) for n in prompt_lengths]
        self.runner.warm_up(prompt_lengths)
        return self.runner.warm_up_seconds

    # -------------------------------------------------------------------------------- requests

    def add_request(
        self, prompt, sampling: SamplingParams | None = None, max_new_tokens: int = 64, stop=None, seed: int = 0,
        priority: int = 0, logprobs: int | None = None,
    ) -> int:
        """Queue a request -> its id. Every argument is checked first: a bad one raises ParameterError naming it
        and queues nothing. logprobs: None, or how many top alternatives (0 to MAX_LOGPROBS) to report with each
        output token's logprob in RequestOutput.logprobs."""
        request = self._check_request(prompt, sampling, max_new_tokens, stop, seed, priority, logprobs)
        self._queue(request)
        return request.request_id

    def check_request(
        self, prompt, sampling: SamplingParams | None = None, max_new_tokens: int = 64, stop=None, seed: int = 0,
        priority: int = 0, logprobs: int | None = None,
    ) -> None:
        """What add_request checks, queueing nothing: a ParameterError naming the bad argument (a front end checks
        every part of a request before it queues any)."""
        self._check_request(prompt, sampling, max_new_tokens, stop, seed, priority, logprobs)

    def _check_request(self, prompt, sampling, max_new_tokens, stop, seed, priority, logprobs=None) -> Request:
        cfg = self.model.cfg
        if sampling is None:
            sampling = SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ParameterError("sampling", f"must be a SamplingParams, not {type(sampling).__name__}")
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        seed = check_seed(seed)
        if not is_int(priority):
            raise ParameterError("priority", "must be an int", value=priority)
        stop = self._check_stop(stop)
        if logprobs is not None and not (is_int(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
            raise ParameterError("logprobs", f"must be None or an int in [0, {MAX_LOGPROBS}]", value=logprobs)
        ids = check_token_ids(prompt, cfg.vocab_size, self.tokenizer, "prompt")
        if len(ids) + max_new_tokens > self.max_model_len:
            raise ParameterError(
                "prompt", f"length {len(ids)} + max_new_tokens={max_new_tokens} exceeds the engine's "
                f"max_model_len={self.max_model_len}",
            )
        # The last sampled token is never computed: a request holds at most len + max_new_tokens - 1 positions.
        pages = -(-(len(ids) + max_new_tokens - 1) // self.page_size)
        usable = self.scheduler.pool.num_usable
        if pages > usable:
            raise ParameterError(
                "prompt", f"length {len(ids)} + max_new_tokens={max_new_tokens} needs {pages} pages of "
                f"{self.page_size} tokens, more than the whole page pool ({usable} pages, num_pages={usable + 1})",
            )
        stop_ids = sampling.stop_ids(cfg.eos_token_ids)
        if len(stop_ids) > STOP_WIDTH:
            raise ParameterError(
                "sampling", f"has {len(stop_ids)} stop token ids with the model's EOS ids; at most {STOP_WIDTH}"
            )
        return Request(
            -1, ids, max_new_tokens, sampling, seed=seed, priority=int(priority), stop_token_ids=stop_ids, stop=stop,
            logprobs=None if logprobs is None else int(logprobs),
        )

    def _check_stop(self, stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)):
            raise ParameterError("stop", "must be a str or a list of str", value=stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ParameterError("stop", "must hold non-empty strings", value=stop)
        if stops and self.tokenizer is None:
            raise ParameterError("stop", "needs a tokenizer (stop strings match text); pass stop token ids instead")
        return tuple(stops)

    def _number(self, request: Request) -> Request:
        request.request_id = next(self._ids)
        return request

    def _queue(self, request: Request) -> None:
        """Queue a checked request (numbered first if it is not yet)."""
        if request.request_id < 0:
            self._number(request)
        if self.tokenizer is not None:
            self._texts[request.request_id] = _Text(self.tokenizer, request.stop)
        self._arrival[request.request_id] = time.perf_counter()
        self.scheduler.add(request)

    def abort(self, request_id: int) -> bool:
        """End a request now (its pages are free before the next step); the next step() reports it with
        finish_reason "abort". -> False if it is unknown or already finished."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return False
        self.scheduler.finish(request, FinishReason.ABORT)
        self._forget(request_id)
        no_tokens = None if request.logprobs is None else []
        self._pending.append(RequestOutput(request_id, [], "" if self.tokenizer else None, "abort", no_tokens))
        return True

    def close(self) -> None:
        """Let go of the runner's compile counter (a jax.monitoring listener); the engine is unusable after."""
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def _forget(self, request_id: int) -> None:
        self._texts.pop(request_id, None)
        self._arrival.pop(request_id, None)
        self._last_token_at.pop(request_id, None)

    # -------------------------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return outputs
        out = self.scheduler.schedule()
        if not out.chunks:
            return outputs
        step_input = batch_lib.build(
            out, max_slots=self.max_slots, pages_per_seq=self.runner.cache.pages_per_seq, buckets=self.buckets,
            packed=self.runner.packed_shapes,
        )
        result = self.runner.run(step_input)
        self._steps += 1
        self._padded_tokens += step_input.num_padded_tokens
        self._computed_tokens += step_input.num_tokens
        self._packed_calls += sum(len(call.groups) > 1 for call in step_input.calls)
        now = time.perf_counter()
        for request in self.scheduler.update(out, result):
            outputs.append(self._output(request, now, result.logprobs.get(request.request_id)))
        return outputs

    def _output(self, request: Request, now: float, logprobs: TokenLogprobs | None) -> RequestOutput:
        """logprobs: the new token's, which the step reports for exactly the requests that asked."""
        assert (logprobs is None) == (request.logprobs is None), (request.request_id, request.logprobs)
        rid = request.request_id
        token = request.output_token_ids[-1]
        previous = self._last_token_at.get(rid)
        if previous is None:
            self._ttft.observe(now - self._arrival[rid])
        else:
            self._itl.observe(now - previous)
        self._last_token_at[rid] = now
        text = None
        if rid in self._texts:
            text, hit_stop = self._texts[rid].feed(token, final=request.is_finished)
            if hit_stop and not request.is_finished:
                self.scheduler.finish(request, FinishReason.STOP)
            elif hit_stop:  # the stop string came with the last token the length allowed: still a stop
                request.finish_reason = FinishReason.STOP
        reason = request.finish_reason.value if request.is_finished else None
        if request.is_finished:
            self._forget(rid)
        return RequestOutput(rid, [token], text, reason, None if logprobs is None else [logprobs])

    # -------------------------------------------------------------------------------- batch API and metrics

    def generate(
        self, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None, max_new_tokens=32,
        seed=0, stop=None,
    ) -> list[GenerationOutput]:
        """Run prompts to completion (alongside whatever else is queued) -> one GenerationOutput each, as
        jaxinfer.generate returns. Each request's keys come from its own seed (one int for all, or a list): the
        tokens of jaxinfer.generate(prompts, seed=[seed_i, ...]). Every prompt is checked before any is queued."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ParameterError("prompts", "must be a non-empty list of prompts (strings or token-id lists)")
        n = len(prompts)
        samplings = per_prompt("sampling", sampling, n)
        limits = per_prompt("max_new_tokens", max_new_tokens, n)
        seeds = per_prompt("seed", seed, n)
        checked = []
        for i, prompt in enumerate(prompts):
            try:
                checked.append(self._check_request(prompt, samplings[i], limits[i], stop, seeds[i], 0))
            except ParameterError as e:
                param = "prompts" if e.param == "prompt" else e.param
                raise ParameterError(param, e.reason, index=i) from None
        for request in checked:
            self._queue(request)
        texts = {r.request_id: [] for r in checked}
        while any(not r.is_finished for r in checked):
            for out in self.step():
                if out.request_id in texts and out.text is not None:
                    texts[out.request_id].append(out.text)
        return [
            GenerationOutput(
                list(r.output_token_ids), "".join(texts[r.request_id]) if self.tokenizer else None,
                r.finish_reason.value,
            )
            for r in checked
        ]

    def metrics(self) -> dict:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_pages_running": s.pool.num_held,
            "kv_pages_cached": s.pool.num_cached_free,
            "kv_pages_free": s.pool.num_free - s.pool.num_cached_free,
            "kv_pages_total": s.pool.num_usable,
            "kv_cache_bytes": self.runner.cache_bytes,  # the device pool as stored (kv_cache_dtype), scales included
            "prefix_cache_queried_tokens": s.counters["prefix_queried_tokens"],
            "prefix_cache_hit_tokens": s.counters["prefix_hit_tokens"],
            "preemptions": s.counters["preemptions"],
            "compilations_after_warm_up": self.runner.compilations_after_warm_up,
            "warm_up_seconds": self.runner.warm_up_seconds,
            "steps": self._steps,
            "computed_tokens": self._computed_tokens,
            "padded_tokens": self._padded_tokens,
            "padded_tokens_per_step": self._padded_tokens / self._steps if self._steps else 0.0,
            "packed_calls": self._packed_calls,  # decodes and a chunk in one forward (pack_chunks_up_to)
            "ttft_seconds": self._ttft.snapshot(),
            "inter_token_latency_seconds": self._itl.snapshot(),
        }
