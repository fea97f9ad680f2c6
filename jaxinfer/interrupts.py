"""Ctrl-C for a command line that spends seconds inside C++ (imports, an XLA compile, a device wait).

A KeyboardInterrupt raised at a random bytecode lands anywhere: in the middle of an import, inside a jax garbage-
collection callback (where Python prints "Exception ignored" and drops it), between a donated buffer and its
replacement. So by default Ctrl-C ends the process at once (exit 130): a watcher thread sees each signal through
`signal.set_wakeup_fd`, which the interpreter's C-level handler writes to immediately, even while the main thread
is stuck in C++. Two kinds of block change that, on the main thread:

- `stoppable()` yields an Event the first Ctrl-C sets; the code polls it where stopping is clean (a streaming
  reply, between chunks). A second Ctrl-C before the block ends ends the process.
- `catchable()`: the first Ctrl-C raises KeyboardInterrupt as Python does, for code whose `except`/`finally`
  must run (a checkpoint write removing its temporary files). A second one while it is pending ends the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
_RAISE = "raise"  # the zone of a catchable() block


class SigintWatch:
    def __init__(self, message: bytes):
        self.message = message
        self.lock = threading.Lock()
        self.zone: threading.Event | str | None = None  # stoppable()'s Event, _RAISE, or None: stop at once
        self.arrived = 0  # SIGINTs the watcher thread has seen
        self.handled = 0  # SIGINTs the main thread's handler has seen
        self.raised = 0  # of those, the ones it turned into KeyboardInterrupt

    def handler(self, signum, frame):
        with self.lock:
            self.handled += 1
            catch = self.zone == _RAISE
            self.raised += catch
        if catch:
            raise KeyboardInterrupt

    def watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum == signal.SIGINT and self._stop_now():
                    os.write(2, self.message)
                    os._exit(EXIT_INTERRUPTED)

    def _stop_now(self) -> bool:
        with self.lock:
            self.arrived += 1
            if isinstance(self.zone, threading.Event):
                stop_now = self.zone.is_set()  # the second press
                self.zone.set()
                return stop_now
            # Not taken by a KeyboardInterrupt and outside catchable(); or the main thread is stuck and two wait.
            return (self.zone is None and self.arrived > self.raised) or self.arrived - self.handled >= 2

    @contextlib.contextmanager
    def _in(self, zone):
        with self.lock:
            outer, self.zone = self.zone, zone
        try:
            yield zone
        finally:
            with self.lock:
                self.zone = outer

    def stoppable(self):
        """`with watch.stoppable() as stop:` ... `if stop.is_set(): break`."""
        return self._in(threading.Event())

    def catchable(self):
        """Inside, Ctrl-C raises KeyboardInterrupt: the code in the block stops through its except/finally."""
        return self._in(_RAISE)


def install(message: str = "jaxinfer: interrupted") -> SigintWatch:
    """Call once, from the main thread, in a process that owns its terminal (the CLI, not a library user)."""
    watch = SigintWatch(f"\n{message}\n".encode())
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, watch.handler)
    threading.Thread(target=watch.watch, args=(read_fd,), name="sigint-watch", daemon=True).start()
    return watch


class PythonDefault:
    """Ctrl-C as Python handles it (KeyboardInterrupt anywhere): the CLI called in-process, e.g. by tests."""

    @contextlib.contextmanager
    def stoppable(self):
        yield threading.Event()

    @contextlib.contextmanager
    def catchable(self):
        yield
