"""AsyncEngine: the engine's step loop on one background thread, streams for asyncio callers.

    engine = jaxinfer.AsyncEngine(model, max_slots=16)
    async for out in engine.stream("Hello", max_new_tokens=32):   # RequestOutput, one token each
        print(out.text, end="")

A request is checked on the caller's thread (a ParameterError raises at the call, nothing queued), then handed to
the step thread, which owns the Engine: between steps it takes new requests and aborts, then runs a step and puts
each output on its request's asyncio queue through the loop's call_soon_threadsafe, so a stream wakes on each
token with no polling. A stream (RequestStream) left before its last output aborts its request: the consuming task
cancelled (a client gone), `aclose()` or `abort()` called (before iteration too), or the stream dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from jaxinfer.engine.engine import Engine, RequestOutput
from jaxinfer.host_memory import release_free_heap


class EngineDeadError(RuntimeError):
    """The step loop stopped on an error; every stream gets it, and new requests are refused."""


class RequestStream:
    """One request's outputs as an async iterator (`async for out in stream`); the last has a finish_reason.
    Left before that, it aborts its request: on `aclose()` or `abort()` (which work whether or not iteration has
    begun), or when the iterating task is cancelled."""

    def __init__(self, engine: AsyncEngine, request_id: int, outputs: asyncio.Queue):
        self.engine, self.request_id, self._outputs = engine, request_id, outputs
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._outputs.get()
        except BaseException:  # cancelled while waiting: nobody will read the rest
            self.abort()
            raise
        if isinstance(out, BaseException):
            self.finished = True
            raise EngineDeadError(f"the engine stopped: {out}") from out
        if out.finish_reason is not None:
            self.finished = True
        return out

    def abort(self) -> None:
        """End the request now if it has not finished (from the stream's event loop)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    def __del__(self):
        self.abort()


class AsyncEngine:
    def __init__(self, model_or_engine, **engine_kwargs):
        """An Engine (or a model and Engine's keyword arguments) driven by a step thread started here."""
        if isinstance(model_or_engine, Engine):
            if engine_kwargs:
                raise TypeError(f"engine settings {sorted(engine_kwargs)} with an Engine: it has its own")
            self.engine = model_or_engine
        else:
            self.engine = Engine(model_or_engine, **engine_kwargs)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()  # held by the step thread while it touches the engine
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------- callers' side

    def stream(
        self, prompt, sampling=None, max_new_tokens: int = 64, stop=None, seed: int = 0, priority: int = 0,
        logprobs: int | None = None,
    ):
        """Queue a request now (a bad one raises ParameterError here) -> an async iterator of its RequestOutputs as
        they come; the last has a finish_reason. Engine.add_request's arguments (logprobs: each token's, with that
        many top alternatives). Call it inside a running event loop."""
        request_id, outputs = self._submit(prompt, sampling, max_new_tokens, stop, seed, priority, logprobs)
        return RequestStream(self, request_id, outputs)

    def _submit(self, prompt, sampling, max_new_tokens, stop, seed, priority, logprobs) -> tuple[int, asyncio.Queue]:
        if self._error is not None or self._closed:
            raise EngineDeadError("the engine is closed" if self._closed else f"the engine stopped: {self._error}")
        request = self.engine._check_request(prompt, sampling, max_new_tokens, stop, seed, priority, logprobs)
        self.engine._number(request)
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), outputs)
        self._command(("add", request))
        return request.request_id, outputs

    def abort(self, request_id: int) -> None:
        """Abort a request (from any thread); a no-op for one already finished."""
        self._streams.pop(request_id, None)
        self._command(("abort", request_id))

    @property
    def dead(self) -> bool:
        """Closed, or its step loop stopped on an error: new requests are refused."""
        return self._closed or self._error is not None

    @property
    def num_unfinished(self) -> int:
        """Requests queued here and not yet finished or aborted (waiting or running): a front end's queue bound."""
        return len(self._streams)

    def metrics(self) -> dict:
        with self._lock:
            return self.engine.metrics()

    def close(self) -> None:
        """Stop the step thread (running requests are dropped) and wait for it."""
        self._closed = True
        self._wake.set()
        self._thread.join()
        self.engine.close()

    def _command(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    # -------------------------------------------------------------------------------- the step thread

    def _loop(self) -> None:
        was_busy = False
        try:
            while not self._closed:
                self._wake.clear()
                with self._lock:
                    self._take_commands()
                    busy = self.engine.has_unfinished()
                    outputs = self.engine.step() if busy else []
                for out in outputs:
                    self._deliver(out)
                if not busy:
                    if was_busy:  # gone idle: the steps' freed temporaries back to the OS, once
                        release_free_heap()
                    self._wake.wait()
                was_busy = busy
        except Exception as e:  # noqa: BLE001 (a device or internal error: every waiting stream hears of it)
            self._error = e
            for loop, outputs in list(self._streams.values()):
                loop.call_soon_threadsafe(outputs.put_nowait, e)
            self._streams.clear()

    def _take_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if payload.request_id in self._streams:  # not aborted while it waited here
                    self.engine._queue(payload)
            else:
                self.engine.abort(payload)

    def _deliver(self, out: RequestOutput) -> None:
        get = self._streams.pop if out.finish_reason is not None else self._streams.get
        target = get(out.request_id, None)
        if target is None:
            return  # aborted: nobody listens
        loop, outputs = target
        loop.call_soon_threadsafe(outputs.put_nowait, out)
