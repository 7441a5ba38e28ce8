"""Watching a child (a julia process or a container): its log, its timeout, our signals.

Shared by the docker and local backends:
* `LogStream` turns output chunks into lines, logs each as it completes (`julia | ...`) and
  keeps the last few for the error message;
* `Watchdog` calls a kill function once the timeout has passed;
* `interrupts()` makes SIGINT and SIGTERM raise KeyboardInterrupt while a child runs, so the
  backend's `finally` kills and removes it, and `deferred_interrupts()` holds them for the
  moment a child is being started, so an interrupt is never lost between start and tracking.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from synthflux.backends.job import Job
from synthflux.errors import ClassifierFailed, CnnFailed, TrainerFailed

log = logging.getLogger("synthflux")

LOG_PREFIX = "julia"
TAIL_LINES = 20


class LogStream:
    """Byte chunks in, lines out: each logged as it completes (unless `listener` takes it, e.g.
    a progress line), the last TAIL_LINES kept."""

    def __init__(self, listener: Callable[[str], bool] | None = None) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial: dict[str, str] = {}
        self.listener = listener

    def feed(self, chunk: bytes | None, stream: str = "out") -> None:
        if not chunk:
            return
        text = self._partial.pop(stream, "") + chunk.decode("utf-8", errors="replace")
        *lines, rest = text.split("\n")
        for line in lines:
            self.line(line)
        if rest:
            self._partial[stream] = rest

    def line(self, text: str) -> None:
        text = text.rstrip("\r\n")
        self.tail.append(text)
        if self.listener is None or not self.listener(text):
            log.info("%s | %s", LOG_PREFIX, text)

    def close(self) -> list[str]:
        for rest in self._partial.values():
            self.line(rest)
        self._partial.clear()
        return list(self.tail)


def failure(
    job: Job, what: str, code: int | None, tail: list[str], timed_out: bool = False
) -> CnnFailed:
    """The error for a failed child; flux_model.jl's own one-line error, when it printed one,
    is the useful part, so it goes into the first line."""
    errors = [line for line in tail if line.startswith("flux_model: error:")]
    headline = f"{what}: {errors[-1]}" if errors else what
    kind = TrainerFailed if job.command == "train" else ClassifierFailed
    return kind(headline, exit_code=code, log_tail=tail, timed_out=timed_out, prefix=LOG_PREFIX)


class Watchdog:
    """`with Watchdog(seconds, kill) as dog: ...`; `dog.fired` tells whether kill was called."""

    def __init__(self, seconds: float, kill: Callable[[], None]) -> None:
        self._event = threading.Event()

        def fire() -> None:
            self._event.set()
            kill()

        self._timer = threading.Timer(seconds, fire)
        self._timer.daemon = True

    @property
    def fired(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _SignalGuard:
    """SIGINT and SIGTERM raise KeyboardInterrupt, or wait while `deferring` is set."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)


_GUARD: _SignalGuard | None = None


@contextmanager
def interrupts() -> Iterator[None]:
    """While a child runs, SIGTERM (docker stop, CI timeouts, kill) cleans up like Ctrl-C
    instead of leaving it running with nobody to enforce its timeout. Main thread only: Python
    delivers signals there; from another thread the caller's own handling applies."""
    global _GUARD
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _SignalGuard()
    previous = {s: signal.signal(s, guard.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _GUARD = guard
    try:
        yield
    finally:
        _GUARD = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for a moment (starting a child), then raise a pending one."""
    guard = _GUARD
    if guard is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    guard.deferring = True
    try:
        yield
    finally:
        guard.deferring = False
        if guard.pending is not None:
            signum, guard.pending = guard.pending, None
            raise KeyboardInterrupt(signal.Signals(signum).name)
