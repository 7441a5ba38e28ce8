"""Backend "docker": one locked-down container of `cnn.image` classifies every shard.

The driver creates, attaches, starts, waits for and always removes the container itself, with
the Docker SDK. The container runs as a non-root user with no network, no capabilities,
no-new-privileges, a read-only root filesystem, memory/CPU limits and a timeout; it can read
the shards and weights and write only the job's output folder. docs/classify.md has the image
contract, the two ways the data reaches the container and why.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthflux.backends.job import Job
from synthflux.backends.serve import open_session
from synthflux.backends.supervise import TAIL_LINES, LogStream, Watchdog, failure
from synthflux.config import PipelineConfig
from synthflux.errors import CnnError
from synthflux.layout import probs_file
from synthflux.storage import atomic_write

log = logging.getLogger("synthflux")

DATA_MOUNT = "/data"  # where the container sees the data root
VOLUME_OUT = "/out"  # volume mode: an anonymous volume holding the output folder below
VOLUME_PREDICTIONS = f"{VOLUME_OUT}/predictions"  # ... where the classifier writes
NOBODY = (65534, 65534)
LABEL = "synthflux.stage"


@dataclass(frozen=True)
class Docker:
    cfg: PipelineConfig

    def classify(self, job: Job) -> None:
        current = open_session()
        if current is not None:  # `synthflux run`: one container serves every job it can
            from synthflux.backends.docker_serve import DockerServer

            key = ("docker", str(self.cfg.data_root.resolve()), self.cfg.cnn.model_dump_json())
            server = current.server(key, lambda: DockerServer(self.cfg))
            if server.serves(job):
                server.run(job)
                return
        run(self.cfg, job)

    train = classify  # one flux_model.jl run either way: the job's arguments say which

    def ready(self) -> None:
        """A clear error now, not after `run --from` deleted results: no engine, no image."""
        client = _client(CnnError)
        try:
            _require_image(client, self.cfg.cnn.image, CnnError)
        finally:
            client.close()


def run(cfg: PipelineConfig, job: Job) -> None:
    """Create, attach, start, wait for and always remove one container for the whole job."""
    import docker
    import requests

    image = cfg.cnn.image
    client = _client(job.error)
    name = f"synthflux-{job.command}-{uuid.uuid4().hex[:12]}"
    container = None
    try:
        _require_image(client, image, job.error)
        _remove_leftovers(client, _labels(cfg, job.command))
        user = container_user()
        plan = _plan(cfg, client, job, user)
        if os.geteuid() == 0 and not plan.copy_back:
            _give_to(job.output, user)  # the bind-mounted output must be writable for nobody
        container = _create(client, cfg, plan, user, name, _labels(cfg, job.command))
        if plan.copy_back:
            container.put_archive(VOLUME_OUT, _out_dir_tar(job.output, user))
        log.info("%s: container %s (%s)", job.command, name, image)
        code, tail, timed_out = _attach_and_wait(container, job)
        _check_exit(container, cfg, job, code, tail, timed_out)
        if plan.copy_back:
            _copy_out(container, VOLUME_PREDICTIONS, job.output, wanted_outputs(job))
    except docker.errors.APIError as e:
        raise job.error(f"Docker refused: {e.explanation or e}") from None
    except (docker.errors.DockerException, requests.RequestException) as e:
        raise job.error(f"lost the Docker daemon during the run: {e}") from None
    finally:
        _remove_container(client, container, name)
        client.close()


def _give_to(folder: Path, user: tuple[int, int]) -> None:
    """chown the output folder and what is in it (a checkpoint to resume from) to the user."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, *user)


# --- the engine and the image --------------------------------------------------------------


def _client(error: Callable[[str], CnnError]) -> Any:
    import docker

    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise error(
            f"cannot reach the Docker daemon at {where}: start Docker (or .ci/start-docker.sh), "
            f"or set DOCKER_HOST to a running one; or use --backend local ({e})"
        ) from None
    return client


def _require_image(client: Any, image: str, error: Callable[[str], CnnError]) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise error(
            f"Docker image {image!r} not found: run `make images` (or `docker build -f "
            f"docker/julia.Dockerfile -t {image} .`), or pass --image TAG"
        ) from None


def container_user() -> tuple[int, int]:
    """Who the classifier runs as: the invoking user, never root (then nobody)."""
    uid, gid = os.getuid(), os.getgid()
    return (uid, gid) if uid != 0 else NOBODY


def _cpu_limit(client: Any, cpus: float) -> float:
    # The engine refuses a limit above its CPU count; a laptop with fewer cores still runs.
    available = float(client.info().get("NCPU") or cpus)
    if cpus > available:
        log.info(
            "classify: cnn.cpus = %g but the engine has %g CPUs; using %g",
            cpus, available, available,
        )  # fmt: skip
    return min(cpus, available)


# --- what the container sees -------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    mounts: list[Any]
    command: list[str]
    copy_back: bool  # volume mode: the output is copied out of the container's /out


def _plan(cfg: PipelineConfig, client: Any, job: Job, user: tuple[int, int]) -> _Plan:
    """Bind mounts of the job's folders (driver on the host), or the named volume read-only
    and an anonymous /out (driver inside compose, cnn.volume set). Inside, every path
    keeps its place under the data root (/data/preprocessed/<source>, /data/model/...)."""
    from docker.types import Mount

    root = cfg.data_root.resolve()
    folders = [folder.resolve() for _, folder in job.inputs]
    files = [f / s for f in folders for s in job.shards] + [job.weights.resolve()]
    if not cfg.cnn.volume:
        _check_readable(job, files, folders, user)
        inputs = [f"{DATA_MOUNT}/{_inside(job, folder, cfg.data_root)}" for _, folder in job.inputs]
        trained = cfg.layout.relative(cfg.layout.default_weights)
        weights = f"{DATA_MOUNT}/{_inside(job, job.weights, cfg.data_root, trained)}"
        output = f"{DATA_MOUNT}/{job.output_inside}"
        mounts = [
            Mount(i, str(f), type="bind", read_only=True)
            for i, f in zip(inputs, folders, strict=True)
        ]
        mounts += [
            Mount(weights, str(job.weights.resolve()), type="bind", read_only=True),
            Mount(output, str(job.output.resolve()), type="bind"),
        ]
        return _Plan(mounts, job.args(inputs, weights, output), copy_back=False)
    _require_volume(job, client, cfg.cnn.volume)
    inputs = [f"{DATA_MOUNT}/{_relative(job, f, root, 'the shards')}" for f in folders]
    rel_weights = _relative(job, job.weights.resolve(), root, "with cnn.volume the weights")
    parents = [root / p for p in Path(rel_weights).parents if str(p) != "."]
    _check_readable(job, files, [root, *folders, *parents], user)
    mounts = [
        Mount(DATA_MOUNT, cfg.cnn.volume, type="volume", read_only=True),
        Mount(VOLUME_OUT, None, type="volume"),  # anonymous: removed with the container
    ]
    command = job.args(inputs, f"{DATA_MOUNT}/{rel_weights}", VOLUME_PREDICTIONS)
    return _Plan(mounts, command, copy_back=True)


def _inside(job: Job, path: Path, root: Path, otherwise: str = "") -> str:
    """Where `path` is under the data root (unresolved: a symlinked folder stays in place)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        if otherwise:
            return otherwise  # e.g. classify.weights elsewhere: mounted where the default lives
        raise job.error(f"{path} is not under the data root {root}") from None


def _relative(job: Job, path: Path, root: Path, what: str) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise job.error(
            f"{path} is not under the data root {root}: {what} must be on the volume"
        ) from None


def _require_volume(job: Job, client: Any, volume: str) -> None:
    import docker

    try:
        client.volumes.get(volume)
    except docker.errors.NotFound:
        raise job.error(f"cnn.volume = {volume!r}: no such Docker volume") from None


def _readable_by(path: Path, uid: int, gid: int, bits: int = 0o4) -> bool:
    """Whether uid:gid has all of `bits` (0o4 read, 0o5 read+search) on path, by its mode."""
    st = path.stat()
    shift = 6 if uid == st.st_uid else 3 if gid == st.st_gid else 0
    return (st.st_mode >> shift) & bits == bits


def _check_readable(job: Job, paths: list[Path], dirs: list[Path], user: tuple[int, int]) -> None:
    """Fail before starting when the container user could not read its inputs."""
    for path, bits in [*((p, 0o4) for p in paths), *((d, 0o5) for d in dirs)]:
        if not _readable_by(path, *user, bits=bits):
            mode = oct(path.stat().st_mode & 0o777)
            folder = path if path.is_dir() else path.parent
            raise job.error(
                f"{path} (mode {mode}) is not readable by the container user {user[0]}:{user[1]}: "
                f"run `chmod -R a+rX {folder}`"
            )


def _out_dir_tar(output: Path, user: tuple[int, int], folder: str = "predictions") -> bytes:
    """A tar of the output folder as it is (empty, or a checkpoint to resume from), for
    put_archive into /out (as /out/`folder`) before the job."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(folder)
        # 0777 too, in case the engine does not keep the tar's owner: no one else is in there.
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o777, *user
        tar.addfile(info)
        for path in sorted(p for p in output.iterdir() if p.is_file()):
            entry = tar.gettarinfo(str(path), f"{folder}/{path.name}")
            entry.uid, entry.gid, entry.mode = *user, 0o666
            with open(path, "rb") as f:
                tar.addfile(entry, f)
    return buf.getvalue()


def wanted_outputs(job: Job) -> set[str]:
    """The names of the files the job may leave in its output folder."""
    return set(job.outputs) | {probs_file(s) for s in job.shards}


def _copy_out(container: Any, source: str, output: Path, wanted: set[str]) -> None:
    """Fetch the job's outputs from the container's `source` folder (in /out) into `output`."""
    chunks, _ = container.get_archive(source)
    with tempfile.TemporaryFile(dir=output) as buf:
        for chunk in chunks:
            buf.write(chunk)
        buf.seek(0)
        with tarfile.open(fileobj=buf, mode="r:") as tar:
            for member in tar:
                name = Path(member.name).name
                src = tar.extractfile(member) if member.isfile() and name in wanted else None
                if src is None:  # nothing else, and no paths from the tar
                    continue
                with atomic_write(output / name) as dst:
                    shutil.copyfileobj(src, dst)


# --- the container's life -------------------------------------------------------------------


def _create(
    client: Any, cfg: PipelineConfig, plan: _Plan, user: tuple[int, int], name: str,
    labels: dict[str, str], **more: Any,
) -> Any:  # fmt: skip
    cpus = _cpu_limit(client, cfg.cnn.cpus)
    threads = str(max(1, int(cpus)))
    return client.containers.create(
        cfg.cnn.image,
        command=plan.command,
        name=name,
        user=f"{user[0]}:{user[1]}",
        network_mode="none",
        cap_drop=["ALL"],
        # Nothing in the image is writable; /tmp is a tmpfs (Julia's scratch depot).
        read_only=True,
        tmpfs={"/tmp": ""},
        security_opt=["no-new-privileges"],
        mem_limit=cfg.cnn.memory,
        memswap_limit=cfg.cnn.memory,  # no swap on top of the memory limit
        nano_cpus=int(cpus * 1e9),
        mounts=plan.mounts,
        labels={**labels, "synthflux.run": name},
        # BLAS and Julia would otherwise size their thread pools by the host's cores.
        environment={"JULIA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads},
        detach=True,
        **more,
    )


def _attach_and_wait(container: Any, job: Job) -> tuple[int, list[str], bool]:
    """Attach, start, stream its log, kill it at the timeout: (exit code, last lines, timed out)."""
    import docker
    import requests

    # Attach before start, as `docker run` does, so no early line is lost.
    stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)

    def kill() -> None:
        with suppress(docker.errors.DockerException, requests.RequestException):
            container.kill()

    logs = LogStream(job.listener)
    container.start()
    with Watchdog(job.timeout_s, kill) as dog:
        for out, err in stream:  # ends when the container stops
            logs.feed(out, "out")
            logs.feed(err, "err")
        code = int(container.wait(timeout=60)["StatusCode"])
    # Docker keeps the order within stdout and within stderr, not between the two.
    tail = logs.close() or container.logs(tail=TAIL_LINES).decode(errors="replace").splitlines()
    return code, tail, dog.fired


def _check_exit(
    container: Any, cfg: PipelineConfig, job: Job, code: int, tail: list[str], timed_out: bool
) -> None:
    what = "classifier" if job.command == "classify" else "trainer"
    if timed_out:
        raise failure(
            job, f"the {what} container timed out after {job.timeout_s}s ({job.timeout_name}) and "
            "was killed", code, tail, True,
        )  # fmt: skip
    if code != 0:
        container.reload()
        oom = container.attrs.get("State", {}).get("OOMKilled")
        why = f" (out of memory: cnn.memory = {cfg.cnn.memory})" if oom else ""
        raise failure(job, f"the {what} container exited with code {code}{why}", code, tail)


def _labels(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    return {LABEL: stage, "synthflux.data_root": str(cfg.data_root.resolve())}


def _remove_leftovers(
    client: Any, labels: dict[str, str], alive: Callable[[Any], bool] = lambda c: False
) -> None:
    """A driver killed outright (SIGKILL, power loss) cannot remove its container: do it now.
    The stage holds the data root's lock, so no live run owns another such container (a
    session's container says whose it is: `alive` keeps a live driver's)."""
    filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
    for old in client.containers.list(all=True, filters=filters):
        if alive(old):
            continue
        log.warning("%s: removing container %s left by an earlier run", labels[LABEL], old.name)
        old.remove(force=True, v=True)


def _remove_container(client: Any, container: Any, name: str) -> None:
    """Kill and remove it, whatever happened; by name if create() was interrupted."""
    import docker
    import requests

    with suppress(docker.errors.DockerException, requests.RequestException):
        (container or client.containers.get(name)).remove(force=True, v=True)
