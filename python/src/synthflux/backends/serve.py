"""One julia for a whole run: `flux_model.jl serve`, kept by a session.

Loading Flux and compiling the model takes a minute or more per julia process, so
`synthflux run` opens a `session()` and the local backend sends every train and classify job
to one `flux_model.jl serve` process instead of starting julia per job (the docker backend
to one container running it: synthflux.backends.docker_serve). The protocol
(julia/src/serve.jl): a job is one line on the server's stdin, the one-shot command's
arguments separated by tabs; the server streams the job's output (its error line included)
and ends it with `flux_model serve: job N exit C`.

* A job that fails (exit C != 0) leaves the server running: the next job uses it.
* A job past its timeout, or interrupted, kills the server (with anything it forked); a server
  that dies during a job is reported with its exit code and last lines. Either way the next
  job starts a fresh server.
* Leaving the session closes the server's stdin (it exits) and kills it if it lingers.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Protocol, TypeVar, cast

from synthflux.backends.job import Job
from synthflux.backends.supervise import LogStream, Watchdog, deferred_interrupts, failure

log = logging.getLogger("synthflux")

END = re.compile(r"flux_model serve: job (\d+) exit (-?\d+)")
CLOSE_WAIT_S = 30.0  # after stdin closes, how long a server may take to exit


class JuliaServer:
    """`julia --project=DIR DIR/flux_model.jl serve`, started on the first job."""

    def __init__(self, exe: str, jdir: Path) -> None:
        self.command = [exe, f"--project={jdir}", str(jdir / "flux_model.jl"), "serve"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.jobs = 0  # jobs sent to the current process
        self.starts = 0  # processes started

    def run(self, job: Job, args: list[str]) -> None:
        """Run one job (flux_model.jl's `args`); raise its failure like a one-shot run."""
        line = job_line(job, args)
        logs = LogStream(job.listener)
        proc = self._process(job)
        self.jobs += 1
        code: int | None = None
        try:
            with Watchdog(job.timeout_s, self.kill) as dog:
                assert proc.stdin is not None and proc.stdout is not None
                try:
                    proc.stdin.write(line.encode())
                    proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass  # it died: reading its output says how
                code = read_job(iter(proc.stdout.readline, b""), self.jobs, logs)
        except BaseException:
            self.kill()  # interrupted mid-job: its state is unknown
            self._reap()
            raise
        tail = logs.close()
        if dog.fired:
            self._reap()
            raise failure(
                job, f"julia timed out after {job.timeout_s}s ({job.timeout_name}) and was "
                "killed (the next job starts a new julia)", None, tail, True,
            )  # fmt: skip
        if code is None:
            died = self._reap()
            raise failure(
                job, f"julia exited with code {died} during the job (the julia server "
                "crashed; the next job starts a new one)", died, tail,
            )  # fmt: skip
        if code != 0:
            raise failure(job, f"julia exited with code {code}", code, tail)

    def _process(self, job: Job) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if self.proc is not None:
            self._reap()
        log.debug("%s: starting %s", job.command, " ".join(self.command))
        # Its own session, as a one-shot julia: Ctrl-C reaches only us, and a kill takes the
        # whole group. An interrupt while it starts waits until `proc` is set.
        with deferred_interrupts():
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.starts += 1
        self.jobs = 0
        return self.proc

    def kill(self) -> None:
        if self.proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def _reap(self) -> int | None:
        """Wait for the dead (or killed) server, close its pipes, forget it; its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()
        return code

    def close(self) -> None:
        """End of the session: stdin closed, so the server exits; killed if it does not."""
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()


def read_job(lines: Iterator[bytes], number: int, logs: LogStream) -> int | None:
    """Stream job `number`'s output lines into `logs` until its end line: its exit code; None
    when the lines end first (the server died)."""
    for raw in lines:
        end = END.fullmatch(raw.decode("utf-8", errors="replace").strip())
        if end is not None and int(end[1]) == number:
            return int(end[2])
        logs.feed(raw)
    return None


def job_line(job: Job, args: list[str]) -> str:
    """The job as one line of tab-separated arguments; a tab or line break in one is an error."""
    for arg in args:
        if any(c in arg for c in "\t\n\r"):
            raise job.error(f"{arg!r}: a tab or line break in a path cannot be sent to julia")
    return "\t".join(args) + "\n"


class Server(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Server)


class Session:
    """The servers of one run: one per key, e.g. (julia, julia/ folder), or a Docker image."""

    def __init__(self) -> None:
        self.servers: dict[Hashable, Server] = {}

    def server(self, key: Hashable, make: Callable[[], S]) -> S:
        """The session's server for `key`, made by `make` the first time."""
        if key not in self.servers:
            self.servers[key] = make()
        return cast(S, self.servers[key])

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


_OPEN: Session | None = None


@contextmanager
def session() -> Iterator[Session]:
    """While open, CNN jobs go to one server per julia (local) or image (docker); nested
    sessions share it."""
    global _OPEN
    if _OPEN is not None:
        yield _OPEN
        return
    _OPEN = Session()
    try:
        yield _OPEN
    finally:
        current, _OPEN = _OPEN, None
        current.close()


def open_session() -> Session | None:
    """The session open now, if any."""
    return _OPEN
