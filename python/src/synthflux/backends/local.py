"""Backend "local": `julia --project=julia julia/flux_model.jl ...` as a subprocess.

The julia is `cnn.julia` (a name on PATH or a path); its output is streamed line by line,
it is killed (with anything it forked) at the job's timeout (cnn.timeout_s or
train.timeout_s) or when we are interrupted. While a `serve.session()` is open (`synthflux
run`), the jobs go to one `flux_model.jl serve` process instead (synthflux.backends.serve).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from synthflux.backends.job import Job
from synthflux.backends.serve import JuliaServer, open_session
from synthflux.backends.supervise import LogStream, Watchdog, deferred_interrupts, failure
from synthflux.config import PipelineConfig
from synthflux.errors import CnnError

log = logging.getLogger("synthflux")


@dataclass(frozen=True)
class Local:
    cfg: PipelineConfig

    def classify(self, job: Job) -> None:
        current = open_session()
        if current is None:
            run(self.cfg, job)
            return
        exe, jdir = _julia(self.cfg, job.error)
        current.server((exe, jdir), lambda: JuliaServer(exe, jdir)).run(job, job_args(job))

    train = classify  # one flux_model.jl run either way: the job's arguments say which

    def ready(self) -> None:
        _julia(self.cfg, CnnError)


def julia_dir() -> Path:
    """The repo's julia/ folder: $SYNTHFLUX_JULIA_DIR, else python/src/synthflux/../../../julia."""
    env = os.environ.get("SYNTHFLUX_JULIA_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[4] / "julia"
    if not (folder / "flux_model.jl").is_file():
        raise CnnError(
            f"no flux_model.jl in {folder}: set SYNTHFLUX_JULIA_DIR to the repository's julia/ "
            "folder, or use --backend docker"
        )
    return folder


def _julia(cfg: PipelineConfig, error: Callable[[str], CnnError]) -> tuple[str, Path]:
    """The julia executable and the julia/ folder, or `error`."""
    try:
        jdir = julia_dir()
    except CnnError as e:
        raise error(str(e)) from None
    exe = shutil.which(cfg.cnn.julia)
    if exe is None:
        raise error(
            f"cnn.julia = {cfg.cnn.julia!r} is not an executable on PATH: install "
            "Julia 1.10+, set cnn.julia to its path, or use --backend docker or reference"
        )
    return exe, jdir


def job_args(job: Job) -> list[str]:
    """flux_model.jl's arguments for the job, with the paths as they are here."""
    inputs = [str(folder) for _, folder in job.inputs]
    return job.args(inputs, str(job.weights), str(job.output))


def julia_command(cfg: PipelineConfig, job: Job) -> list[str]:
    """The full command line: the julia executable, the project, flux_model.jl, the job's."""
    exe, jdir = _julia(cfg, job.error)
    return [exe, f"--project={jdir}", str(jdir / "flux_model.jl"), *job_args(job)]


def run(cfg: PipelineConfig, job: Job) -> None:
    cmd = julia_command(cfg, job)
    log.debug("%s: %s", job.command, " ".join(cmd))
    timeout = job.timeout_s
    logs = LogStream(job.listener)
    proc: subprocess.Popen[bytes] | None = None

    def kill() -> None:
        if proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    try:
        # Its own session: Ctrl-C reaches only us, and we kill the whole group (julia may
        # fork). An interrupt while it starts waits until `proc` is set, so it is never lost.
        with deferred_interrupts():
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        with Watchdog(timeout, kill) as dog:
            if proc.stdout is not None:
                for raw in proc.stdout:
                    logs.feed(raw)
            code = proc.wait()
    finally:
        if proc is not None:
            if proc.poll() is None:
                kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    tail = logs.close()
    if dog.fired:
        raise failure(
            job, f"julia timed out after {timeout}s ({job.timeout_name}) and was killed",
            code, tail, True,
        )  # fmt: skip
    if code != 0:
        raise failure(job, f"julia exited with code {code}", code, tail)
