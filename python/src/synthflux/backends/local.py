"""Backend "local": `julia --project=julia julia/flux_model.jl ...` as a subprocess.

The julia is `classify.julia` (a name on PATH or a path); its output is streamed line by line,
it is killed (with anything it forked) at `classify.timeout_s` or when we are interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from contextlib import suppress
from pathlib import Path

from synthflux.backends.job import Job
from synthflux.backends.supervise import LogStream, Watchdog, deferred_interrupts, failure
from synthflux.config import PipelineConfig
from synthflux.errors import ClassifyError

log = logging.getLogger("synthflux")


def julia_dir() -> Path:
    """The repo's julia/ folder: $SYNTHFLUX_JULIA_DIR, else python/src/synthflux/../../../julia."""
    env = os.environ.get("SYNTHFLUX_JULIA_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[4] / "julia"
    if not (folder / "flux_model.jl").is_file():
        raise ClassifyError(
            f"no flux_model.jl in {folder}: set SYNTHFLUX_JULIA_DIR to the repository's julia/ "
            "folder, or use --backend docker"
        )
    return folder


def julia_command(cfg: PipelineConfig, args: list[str]) -> list[str]:
    """The full command line: the julia executable, the project, flux_model.jl, `args`."""
    jdir = julia_dir()
    exe = shutil.which(cfg.classify.julia)
    if exe is None:
        raise ClassifyError(
            f"classify.julia = {cfg.classify.julia!r} is not an executable on PATH: install "
            "Julia 1.10+, set classify.julia to its path, or use --backend docker"
        )
    return [exe, f"--project={jdir}", str(jdir / "flux_model.jl"), *args]


def run(cfg: PipelineConfig, job: Job) -> None:
    inputs = [str(folder) for _, folder in job.inputs]
    cmd = julia_command(cfg, job.args(inputs, str(job.weights), str(job.output)))
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
            f"julia timed out after {timeout}s (classify.timeout_s) and was killed",
            code,
            tail,
            True,
        )
    if code != 0:
        raise failure(f"julia exited with code {code}", code, tail)
