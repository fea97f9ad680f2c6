"""Ctrl-C for a command line that spends seconds inside C++ (imports, an XLA compile, a device wait).

A KeyboardInterrupt raised at a random point of an import or a jax call leaves half-initialised modules and
tracebacks from C extensions behind. So by default Ctrl-C ends the process at once (exit 130): a watcher thread
sees each signal through `signal.set_wakeup_fd`, which the interpreter's C-level handler writes to immediately,
even while the main thread is stuck in C++. Code that can stop cleanly (a streaming reply, a checkpoint write
that must remove its temporary files) runs inside `catchable()`: there the first Ctrl-C raises KeyboardInterrupt
as usual, at the main thread's next bytecode, and a second one while the first is still pending ends the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


class SigintWatch:
    def __init__(self, message: bytes):
        self.message = message
        self.arrived = 0  # SIGINTs the watcher thread has seen
        self.handled = 0  # SIGINTs the main thread's handler has seen
        self.raised = 0  # of those, the ones it turned into KeyboardInterrupt (inside catchable())
        self.catchable_depth = 0  # depth of catchable() blocks the main thread is in
        self.lock = threading.Lock()

    def handler(self, signum, frame):
        with self.lock:
            self.handled += 1
            catchable = self.catchable_depth > 0
            self.raised += catchable
        if catchable:
            raise KeyboardInterrupt
        # Outside catchable(), the watcher thread ends the process.

    @contextlib.contextmanager
    def catchable(self):
        """Inside, Ctrl-C raises KeyboardInterrupt: the code in the block stops cleanly."""
        with self.lock:
            self.catchable_depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.catchable_depth -= 1

    def watch(self, read_fd: int) -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum != signal.SIGINT:
                    continue
                with self.lock:
                    self.arrived += 1
                    # Not taken by a KeyboardInterrupt, and outside catchable(); or stuck: two not handled yet.
                    untaken = self.arrived > self.raised and self.catchable_depth == 0
                    stop_now = untaken or self.arrived - self.handled >= 2
                if stop_now:
                    os.write(2, self.message)
                    os._exit(EXIT_INTERRUPTED)


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
    """Ctrl-C as Python handles it (KeyboardInterrupt everywhere): the CLI called in-process, e.g. by tests."""

    @contextlib.contextmanager
    def catchable(self):
        yield
