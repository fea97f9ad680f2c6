"""The runner: the engine's only jax file. Params, the donated device cache, the per-slot sampling rows, and the
compiled step programs of jaxinfer/steps.py, all compiled at start-up; a step only transfers numpy arrays and
dispatches them.

Compilations are counted through jax.monitoring while a step runs: after warm-up the count stays 0 (a metric,
and a test).
"""

from __future__ import annotations

import contextlib
import threading
import time

import jax
import numpy as np
from jax import monitoring

from jaxinfer import kv_cache, sharding, steps
from jaxinfer.host_memory import release_free_heap
from jaxinfer.engine.batch import Call, StepInput, warm_up_calls
from jaxinfer.engine.request import TokenLogprobs
from jaxinfer.engine.scheduler import SlotWrite, StepResult
from jaxinfer.runtime import Runtime
from jaxinfer.sampling import SamplingArrays, seed_words
from jaxinfer.sampling_params import SamplingParams

_GREEDY = SamplingParams(temperature=0.0)

MAX_LOGPROBS = steps.MAX_LOGPROBS  # the most top alternatives a request may ask to see with each token

_COMPILE_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class _CompileCounter:
    """Programs lowered while `counting()` is active on this thread (jax.monitoring's public hook)."""

    def __init__(self):
        self.count = 0
        self._thread = None
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, seconds, **kwargs):
        if name == _COMPILE_EVENT and self._thread == threading.get_ident():
            self.count += 1

    @contextlib.contextmanager
    def counting(self):
        self._thread = threading.get_ident()
        try:
            yield
        finally:
            self._thread = None

    def close(self):
        monitoring.unregister_event_duration_listener(self._on_event)


class Runner:
    def __init__(
        self, model, *, max_slots: int, num_pages: int, page_size: int, pages_per_seq: int,
        buckets: tuple[int, ...], stop_width: int, attention_backend: str | None = None,
        poison_new_pages: bool = False, pack_chunks_up_to: int = 0,
    ):
        self.params, self.cfg = model.params, model.cfg
        self.runtime = Runtime(attention_backend=attention_backend, mesh=model.mesh,
                               quantized_matmul=model.quantized_matmul)
        self.max_slots, self.buckets, self.stop_width = max_slots, buckets, stop_width
        self.num_pages = num_pages
        self.poison_new_pages = poison_new_pages
        self.pack_chunks_up_to = pack_chunks_up_to
        sizes = {"num_pages": num_pages, "page_size": page_size, "max_seqs": max_slots, "pages_per_seq": pages_per_seq,
                 "kv_cache_dtype": model.kv_cache_dtype}  # the pool stored as the model says (jaxinfer.kv_cache)
        if model.mesh is None:
            self.cache = kv_cache.init_cache(self.cfg, **sizes)
        else:  # tensor parallel: the pool split by kv head, as generate's
            self.cache = sharding.init_cache(self.cfg, model.mesh, **sizes)
        self.cache_bytes = kv_cache.nbytes(self.cache)  # the pool and its scales, over every device
        self.slots = steps.init_slot_rows(max_slots, stop_width, self.cfg.vocab_size)
        if model.mesh is not None:  # where the step leaves them, so the second step runs the first one's program
            replicated = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
            self.slots = jax.device_put(self.slots, steps.SlotRows(
                sampling=replicated, keys=replicated, stop_ids=replicated, seen=sharding.vocab_split(model.mesh)
            ))
        self._compiles = _CompileCounter()
        self.compilations_after_warm_up = 0
        self.warm_up_seconds = None
        self.packed_shapes = frozenset()  # the decode-beside-a-chunk call shapes compiled (batch.build's `packed`)

    def close(self):
        self._compiles.close()

    def warm_up(self, prompt_lengths=None) -> None:
        """Compile the programs of a step: one all-padding call of each shape (writes nothing; every shape, or
        those prompts of these lengths meet: batch.warm_up_calls), a slot write. The decode-beside-a-chunk pairs
        compiled become packed_shapes, which batch.build then uses."""
        start = time.perf_counter()
        page_table = np.zeros((self.max_slots, self.cache.pages_per_seq), np.int32)
        lengths = np.zeros((self.max_slots,), np.int32)
        for call in warm_up_calls(self.max_slots, self.buckets, prompt_lengths, self.pack_chunks_up_to):
            tok, _, _ = self._dispatch(call, page_table, lengths)
            if len(call.groups) > 1:
                self.packed_shapes = self.packed_shapes | {call.shape}
        self._write_slot(SlotWrite(0, -1, _GREEDY, 0, (), ()))
        if self.poison_new_pages:
            self._poison([])
        jax.block_until_ready((tok, self.cache, self.slots))
        release_free_heap()  # what loading and running every program freed (0.35 GB on the default model)
        self.warm_up_seconds = time.perf_counter() - start

    def run(self, step: StepInput) -> StepResult:
        with self._compiles.counting():
            for write in step.slot_writes:
                self._write_slot(write)
            if self.poison_new_pages and step.new_pages:
                self._poison(step.new_pages)
            results = [self._dispatch(call, step.page_table, step.lengths) for call in step.calls]
            sampled, stopped, logprobs = {}, set(), {}
            for call, (tok, stop, call_logprobs) in zip(step.calls, results):
                tok, stop = np.asarray(tok), np.asarray(stop)
                for row, request_id in enumerate(call.request_ids):
                    if request_id is not None:
                        sampled[request_id] = int(tok[row])
                        if stop[row]:
                            stopped.add(request_id)
                if call.want_logprobs:  # otherwise they stay on the device: the zeros of the branch not taken
                    logprobs.update(_token_logprobs(call, tok, call_logprobs))
        self.compilations_after_warm_up = self._compiles.count
        return StepResult(sampled, frozenset(stopped), logprobs)

    def _dispatch(self, call: Call, page_table: np.ndarray, lengths: np.ndarray):
        """-> the call's (tokens [R], stopped [R], logprobs) on the device, logprobs computed if a row wants them."""
        rows = tuple(steps.StepRows(g.tokens, g.positions, g.seq_ids, g.sample, g.output_index) for g in call.groups)
        tok, stopped, logprobs, self.cache, self.slots = steps.compute_and_sample(
            self.params, self.cfg, self.cache, self.slots, page_table, lengths, rows, np.bool_(call.want_logprobs),
            runtime=self.runtime,
        )
        return tok, stopped, logprobs

    def _write_slot(self, write: SlotWrite) -> None:
        sampling = SamplingArrays.from_params([write.sampling], 1)
        stop_ids = np.full((self.stop_width,), -1, np.int32)
        stop_ids[: len(write.stop_token_ids)] = write.stop_token_ids
        seen = np.zeros((self.cfg.vocab_size,), bool)
        seen[list(write.seen_token_ids)] = True
        self.slots = steps.write_slot(
            self.slots, np.int32(write.slot), sampling, seed_words(write.seed), stop_ids, seen
        )

    def _poison(self, pages: list[int]) -> None:
        mask = np.zeros((self.num_pages,), bool)
        mask[pages] = True
        self.cache = steps.poison_pages(self.cache, mask)


def _token_logprobs(call: Call, tok: np.ndarray, call_logprobs) -> dict[int, TokenLogprobs]:
    """request_id -> its token's logprobs, for the rows that asked, each top list cut to what its request asked."""
    token_logprob, top_ids, top_logprobs = (np.asarray(a) for a in call_logprobs)  # [R], [R, K], [R, K]
    return {
        request_id: TokenLogprobs(
            int(tok[row]), float(token_logprob[row]),
            tuple(zip(top_ids[row, :n].tolist(), top_logprobs[row, :n].tolist())),
        )
        for row, (request_id, n) in enumerate(zip(call.request_ids, call.logprobs)) if n is not None
    }
