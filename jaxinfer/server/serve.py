"""Running the app under uvicorn with a drain on SIGTERM (and Ctrl-C):

    run(create_app(engine, "smollm2"), host="127.0.0.1", port=8000, shutdown_timeout=30)

The first signal starts the drain: every new request gets a 503 (the app's gate, /health included, so a load
balancer takes the server out), the requests in flight run on until they finish or `shutdown_timeout` seconds pass;
then what is left is cut short (a stream ends with an error event and [DONE], an unstreamed request gets a 503, their
engine requests aborted), uvicorn shuts down and run() returns, so the process exits 0. A second signal stops at once. Built on uvicorn.Server's two hooks: `handle_exit` (its signal
handler; this one does not re-raise the signal after shutdown, as uvicorn's own does, which would exit 143) and
`on_tick` (its 0.1 s main-loop tick, which ends serving when it returns True).
"""

from __future__ import annotations

import logging
import time

import uvicorn

log = logging.getLogger("uvicorn.error")
CUT_AFTER_SECONDS = 1.0  # what the cut responses have to send their last events before uvicorn cancels them


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float):
        """state: the app's ServerState (create_app's app.state.server): its draining flag and in-flight count."""
        super().__init__(config)
        self._state, self.shutdown_timeout = state, shutdown_timeout
        self.drain_deadline: float | None = None
        self.cut_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            self._state.draining = True
            log.info("Draining: new requests get 503; waiting up to %.0f s for %d in flight",
                     self.shutdown_timeout, self._state.in_flight)
        else:  # a second signal: no more waiting
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self.drain_deadline is None:
            return should_exit
        now = time.monotonic()
        if now >= self.drain_deadline and self.cut_at is None and self._state.in_flight:
            log.info("Drain time up: cutting %d requests short", self._state.in_flight)
            self._state.cut.set()
            self.cut_at = now
        cut_over = self.cut_at is not None and now >= self.cut_at + CUT_AFTER_SECONDS
        return should_exit or self._state.in_flight == 0 or cut_over


def run(app, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Serve `app` (create_app's) until a signal's drain ends."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=CUT_AFTER_SECONDS)
    DrainingServer(config, app.state.server, shutdown_timeout).run()
