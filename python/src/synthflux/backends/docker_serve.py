"""One container for a whole run: `flux_model.jl serve` in a locked-down container.

The docker backend's side of `serve.session()`: while `synthflux run` holds a session, every
train and classify job goes, as one line on the container's stdin (julia/src/serve.jl's
protocol), to one container of `cnn.image`, so Julia starts and compiles the model once per
run. The container is sealed off as a one-shot one is (no network, no capabilities, non-root,
read-only root filesystem, memory/CPU limits); what differs, because the jobs it will serve are
not known when it starts:
* it sees the whole data root read-only at /data (a bind mount, or the named volume
  `cnn.volume`) and writes only its anonymous /out volume;
* job N writes into /out/job-N: the job's output folder is copied in first (a checkpoint to
  resume from), and the files the job may write are copied out into the output folder after
  it, whether it succeeded or failed (so a failed training keeps its checkpoint);
* a job whose inputs or weights the container cannot see (outside the data root, or behind a
  folder the container user may not enter) runs in a one-shot container instead.
A job past its timeout, an interrupt, or a server that dies: what the job wrote is copied out,
the container is removed, and the next job starts a new one. Leaving the session removes it.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from synthflux.backends.docker import (
    DATA_MOUNT,
    VOLUME_OUT,
    _check_readable,
    _client,
    _copy_out,
    _create,
    _labels,
    _out_dir_tar,
    _Plan,
    _readable_by,
    _remove_leftovers,
    _require_image,
    _require_volume,
    container_user,
    wanted_outputs,
)
from synthflux.backends.job import Job
from synthflux.backends.serve import job_line, read_job
from synthflux.backends.supervise import LogStream, Watchdog, deferred_interrupts, failure
from synthflux.config import PipelineConfig

log = logging.getLogger("synthflux")

DRIVER = "synthflux.driver"  # label: host:pid of the driver that owns a serve container


class DockerServer:
    """`flux_model.jl serve` in one container of `cnn.image`, started on the first job."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.root = cfg.data_root.resolve()
        self.user = container_user()
        self.client: Any = None
        self.container: Any = None
        self.name = ""
        self.stdin: Any = None  # the attach socket the jobs are written to
        self.lines: Iterator[bytes] = iter(())  # the container's output lines, across jobs
        self.jobs = 0  # jobs sent to the current container
        self.starts = 0  # containers started

    def serves(self, job: Job) -> bool:
        """Whether the container can see the job's inputs and weights (else: one-shot)."""
        paths = [folder.resolve() for _, folder in job.inputs] + [job.weights.resolve().parent]
        if not all(p.is_relative_to(self.root) for p in paths):
            return False
        below = {
            q for p in paths for q in (p.relative_to(self.root), *p.relative_to(self.root).parents)
        }
        return all(_readable_by(self.root / q, *self.user, bits=0o5) for q in below)

    def run(self, job: Job) -> None:
        """Run one job in the container; raise its failure like a one-shot container's."""
        import docker
        import requests

        try:
            self._run(job)
        except docker.errors.APIError as e:
            self._discard()
            raise job.error(f"Docker refused: {e.explanation or e}") from None
        except (docker.errors.DockerException, requests.RequestException) as e:
            self._discard()
            raise job.error(f"lost the Docker daemon during the run: {e}") from None

    def _run(self, job: Job) -> None:
        inputs = [self._inside(folder) for _, folder in job.inputs]
        files = [f / s for _, f in job.inputs for s in job.shards] + [job.weights]
        _check_readable(job, files, [], self.user)
        container = self._container(job)
        self.jobs += 1
        folder = f"job-{self.jobs}"
        container.put_archive(VOLUME_OUT, _out_dir_tar(job.output, self.user, folder))
        line = job_line(job, job.args(inputs, self._inside(job.weights), f"{VOLUME_OUT}/{folder}"))
        logs = LogStream(job.listener)
        code: int | None = None
        try:
            with Watchdog(job.timeout_s, self._kill) as dog:
                self._send(line.encode())
                code = read_job(self.lines, self.jobs, logs)
        finally:
            died = self._salvage(job, folder) if code is None else None
        tail = logs.close()
        if dog.fired:
            raise failure(
                job, f"the julia server container timed out after {job.timeout_s}s "
                f"({job.timeout_name}) and was killed (the next job starts a new one)",
                died, tail, True,
            )  # fmt: skip
        if code is None:
            raise failure(
                job, f"the julia server container exited with code {died} during the job "
                "(the next job starts a new one)", died, tail,
            )  # fmt: skip
        _copy_out(container, f"{VOLUME_OUT}/{folder}", job.output, wanted_outputs(job))
        if code != 0:
            raise failure(job, f"julia exited with code {code} in the server container", code, tail)

    def _inside(self, path: Path) -> str:
        return f"{DATA_MOUNT}/{path.resolve().relative_to(self.root).as_posix()}"

    def _container(self, job: Job) -> Any:
        """The running container, created, attached and started if there is none."""
        if self.container is not None:
            return self.container
        cfg = self.cfg
        if self.client is None:
            self.client = _client(job.error)
        _require_image(self.client, cfg.cnn.image, job.error)
        labels = _labels(cfg, "serve")
        _remove_leftovers(self.client, labels, alive=_driver_alive)
        if cfg.cnn.volume:
            _require_volume(job, self.client, cfg.cnn.volume)
            data = _mount(DATA_MOUNT, cfg.cnn.volume, "volume")
        else:
            data = _mount(DATA_MOUNT, str(self.root), "bind")
        plan = _Plan([data, _mount(VOLUME_OUT, None, "volume", False)], ["serve"], True)
        self.name = f"synthflux-serve-{uuid.uuid4().hex[:12]}"
        labels[DRIVER] = f"{socket.gethostname()}:{os.getpid()}"
        with deferred_interrupts():  # an interrupt now finds the container to remove
            self.container = _create(
                self.client, cfg, plan, self.user, self.name, labels, stdin_open=True
            )
        # Attach before start, as `docker run` does, so no early line is lost.
        self.lines = _lines(
            self.container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
        )
        self.stdin = self.container.attach_socket(params={"stdin": 1, "stream": 1})
        self.container.start()
        self.starts += 1
        self.jobs = 0
        log.info(
            "%s: container %s (%s) serves the run's jobs", job.command, self.name, cfg.cnn.image
        )
        return self.container

    def _send(self, data: bytes) -> None:
        raw = getattr(self.stdin, "_sock", self.stdin)  # the SDK's socket wraps the real one
        with suppress(OSError):  # it died: reading its output says how
            raw.sendall(data)

    def _salvage(self, job: Job, folder: str) -> int | None:
        """After a timeout, an interrupt or a crash: stop the container, copy out what the job
        wrote (a checkpoint), remove it; its exit code if known."""
        import docker
        import requests

        code = None
        self._kill()
        with suppress(docker.errors.DockerException, requests.RequestException):
            code = int(self.container.wait(timeout=60)["StatusCode"])
        with suppress(docker.errors.DockerException, requests.RequestException):
            _copy_out(self.container, f"{VOLUME_OUT}/{folder}", job.output, wanted_outputs(job))
        self._discard()
        return code

    def _kill(self) -> None:
        import docker
        import requests

        with suppress(docker.errors.DockerException, requests.RequestException):
            if self.container is not None:
                self.container.kill()

    def _discard(self) -> None:
        """Remove the container (by name if its creation was cut short); the next job starts
        a new one."""
        import docker
        import requests

        if self.stdin is not None:
            with suppress(OSError):
                self.stdin.close()
        if self.client is not None and self.name:
            with suppress(docker.errors.DockerException, requests.RequestException):
                (self.container or self.client.containers.get(self.name)).remove(force=True, v=True)
        self.container, self.stdin, self.lines, self.name = None, None, iter(()), ""

    def close(self) -> None:
        """End of the session: the container is removed (every job's outputs are out)."""
        self._discard()
        if self.client is not None:
            self.client.close()
            self.client = None


def _lines(frames: Iterator[tuple[bytes | None, bytes | None]]) -> Iterator[bytes]:
    """Whole lines (newline kept) of a demuxed attach stream's stdout and stderr, each stream
    buffered on its own until its newline; what is left when the stream ends, last."""
    partial = [b"", b""]
    for chunks in frames:
        for i, chunk in enumerate(chunks):
            if chunk:
                *whole, partial[i] = (partial[i] + chunk).split(b"\n")
                yield from (line + b"\n" for line in whole)
    yield from (rest for rest in partial if rest)


def _mount(target: str, source: str | None, kind: str, read_only: bool = True) -> Any:
    from docker.types import Mount

    return Mount(target, source, type=kind, read_only=read_only)


def _driver_alive(container: Any) -> bool:
    """Whether the driver that owns a serve container may be alive: on another host it cannot
    be told (so yes); on this one, whether its pid runs."""
    host, _, pid = container.labels.get(DRIVER, "").rpartition(":")
    if host and host != socket.gethostname():
        return True
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    return True
