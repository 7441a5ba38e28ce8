"""Stage 3, classify: run the Flux CNN (julia/flux_model.jl) over every shard, check and join
its probabilities with the manifest, and report.

One classifier run covers all shards: one container (backend "docker") or one `julia`
subprocess (backend "local"), never one per shard. It writes into a private staging folder,
DATA/predictions/.classify-*/; every expected `shard-NNNNN.probs.npz` is read back and checked
before anything is published or reported, then moved into DATA/predictions/, followed by
predictions.csv, summary.json and, last, stage.json (the done marker).

The image's contract (docker/julia.Dockerfile must follow it):

    ENTRYPOINT ["julia", "--project=/opt/synthflux/julia", "/opt/synthflux/julia/flux_model.jl"]

The driver passes only flux_model.jl's own arguments as the container command:

    --input /data/preprocessed --weights /data/model/weights.npz --output OUT --batch-size B

The image must run as an arbitrary non-root uid with no network and no capabilities: its
Julia depot must be readable by everyone and precompiled at build time (a writable depot, if
Julia needs one, goes first in JULIA_DEPOT_PATH under /tmp).

How the data reaches the container:

* Driver on the host (classify.volume empty): bind mounts of DATA's subfolders --
  DATA/preprocessed -> /data/preprocessed (read-only), the weights file ->
  /data/model/weights.npz (read-only), and the staging folder -> /data/predictions
  (read-write; OUT = /data/predictions). The container can write nowhere else on the host.
* Driver inside compose (classify.volume = the named volume, mounted at data_root in the
  driver's own container): the whole volume is mounted read-only at /data, and the classifier
  writes to /out/predictions (OUT) on an anonymous volume at /out, prepared before start with
  a folder the container user owns; after a clean exit the driver copies it back with the
  archive API, and the anonymous volume goes with the container.
  Why not a read-write volume subpath for the output: it needs Docker Engine 26+ (API 1.45),
  Debian bookworm ships 20.10, and it would also mean chowning a folder on the shared volume.
  With the copy-back the classifier cannot write to the volume at all, on any engine.
  The weights must then live on the volume (under data_root).

Container hardening: the invoking uid:gid, or 65534:65534 (nobody) when the driver is root
(the staging folder is chowned to it); network_mode "none"; cap_drop ALL;
no-new-privileges; a read-only root filesystem with a tmpfs /tmp (as compose.yaml's classify
service); memory (no extra swap) and CPU limits from [classify]; labels
`synthflux.stage=classify`, `synthflux.run=<id>`, `synthflux.data_root=<path>`. The driver
creates, attaches, starts and waits, and removes the container (and its anonymous volume)
itself in a `finally` -- never auto_remove, which loses the logs of short-lived containers
(docker-py #1813, #2427, #3247) -- on success, error, timeout (killed after
classify.timeout_s), Ctrl-C and SIGTERM alike; one left by a driver killed outright is
removed by the next run on the same data root.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from synthflux.config import BACKENDS, PipelineConfig
from synthflux.errors import ClassifyError, DataError
from synthflux.generate import generated_dir, read_manifest
from synthflux.preprocess import preprocessed_dir, read_dataset
from synthflux.storage import atomic_write, write_json_atomic

log = logging.getLogger("synthflux")

DATA_MOUNT = "/data"  # where the container sees the data root
VOLUME_OUT = "/out"  # volume mode: an anonymous volume holding the output folder below
VOLUME_PREDICTIONS = f"{VOLUME_OUT}/predictions"  # ... where the classifier writes
NOBODY = (65534, 65534)
LABEL = "synthflux.stage"
LOG_PREFIX = "julia"
TAIL_LINES = 20
SUM_TOLERANCE = 1e-5
SHARD_NAME = re.compile(r"^shard-\d+\.npz$")


class ClassifierFailed(ClassifyError):
    """The classifier exited non-zero or timed out; carries its exit code and last log lines."""

    def __init__(
        self, message: str, *, exit_code: int | None, log_tail: list[str], timed_out: bool = False
    ) -> None:
        shown = "".join(f"\n  {LOG_PREFIX} | {line}" for line in log_tail)
        more = f"; last {len(log_tail)} log lines:{shown}" if log_tail else "; it printed nothing"
        super().__init__(message + more)
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.timed_out = timed_out


# --- the inputs: shards, manifest, weights ---------------------------------------------------


@dataclass(frozen=True)
class Shard:
    file: str  # "shard-00000.npz"
    path: Path
    ids: np.ndarray
    labels: np.ndarray

    @property
    def probs_file(self) -> str:
        return self.file.removesuffix(".npz") + ".probs.npz"


@dataclass(frozen=True)
class Dataset:
    classes: list[str]
    width: int
    height: int
    channels: int
    shards: list[Shard]

    @property
    def images(self) -> int:
        return sum(len(s.ids) for s in self.shards)


def predictions_dir(cfg: PipelineConfig) -> Path:
    return cfg.data_root / "predictions"


def load_dataset(cfg: PipelineConfig) -> Dataset:
    """dataset.json plus each listed shard's ids and labels (the images stay on disk)."""
    prep = preprocessed_dir(cfg)
    meta_path = prep / "dataset.json"
    meta = read_dataset(cfg)
    try:
        classes = [str(c) for c in meta["classes"]]
        dims = int(meta["width"]), int(meta["height"]), int(meta["channels"])
        entries = [(str(e["file"]), int(e["count"])) for e in meta["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None
    if classes != cfg.class_names:
        raise DataError(
            f"{meta_path} has classes {classes} but the config has {cfg.class_names}: "
            "re-run generate and preprocess for this config"
        )
    if not entries:
        raise DataError(f"{meta_path} lists no shards: re-run `synthflux preprocess`")
    shards = []
    for name, count in entries:
        if not SHARD_NAME.match(name):
            raise DataError(f"{meta_path}: shard file {name!r} is not named shard-NNNNN.npz")
        path = prep / name
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, labels = z["ids"], z["labels"]
        except FileNotFoundError:
            raise DataError(f"{path} is listed in dataset.json but missing") from None
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise DataError(f"{path}: cannot read ids/labels ({e})") from None
        if ids.shape != (count,) or labels.shape != (count,):
            raise DataError(
                f"{path}: dataset.json says {count} images, the shard has ids {ids.shape}"
            )
        shards.append(Shard(name, path, ids.astype(np.int64), labels.astype(np.int64)))
    return Dataset(classes, *dims, shards)


def join_manifest(cfg: PipelineConfig, ds: Dataset) -> dict[int, dict[str, Any]]:
    """The generation record of every shard image; labels must agree with the shards'."""
    path = generated_dir(cfg) / "manifest.jsonl"
    by_id = {int(r["id"]): r for r in read_manifest(cfg) if "id" in r}
    for shard in ds.shards:
        for image_id, label in zip(shard.ids.tolist(), shard.labels.tolist(), strict=True):
            rec = by_id.get(image_id)
            if rec is None:
                raise DataError(
                    f"{shard.path}: image id {image_id} is not in {path}: re-run preprocess"
                )
            if rec.get("label") != label:
                raise DataError(
                    f"{shard.path}: image id {image_id} has label {label}, the manifest says "
                    f"{rec.get('label')}: re-run preprocess"
                )
    return by_id


def weights_path(cfg: PipelineConfig) -> Path:
    return (
        Path(cfg.classify.weights)
        if cfg.classify.weights
        else cfg.data_root / "model" / "weights.npz"
    )


def ensure_weights(cfg: PipelineConfig, ds: Dataset) -> Path:
    """The weights file; the default one is created from `seed` when it does not exist yet."""
    from synthflux import reference

    path = weights_path(cfg)
    if not path.is_file():
        if cfg.classify.weights:
            raise ClassifyError(f"classify.weights = {cfg.classify.weights!r}: no such file")
        weights = reference.init_weights(
            ds.width, ds.height, ds.channels, len(ds.classes), seed=cfg.seed
        )
        reference.save_weights(path, weights)
        log.info("classify: no weights yet, initialised random ones (seed %d): %s", cfg.seed, path)
    spec = reference.spec_of(reference.load_weights(path))
    want = (ds.width, ds.height, ds.channels, len(ds.classes))
    have = (spec.width, spec.height, spec.channels, spec.n_classes)
    if have != want:
        raise ClassifyError(
            f"{path} is for {have[0]}x{have[1]}x{have[2]} images and {have[3]} classes, the "
            f"dataset has {want[0]}x{want[1]}x{want[2]} and {want[3]}: point classify.weights "
            "at matching weights (or delete the default file to start from random ones)"
        )
    return path


# --- streaming the classifier's log --------------------------------------------------------


class _LogStream:
    """Turns byte chunks into lines, logs each as it completes, keeps the last few."""

    def __init__(self) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial: dict[str, str] = {}

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
        log.info("%s | %s", LOG_PREFIX, text)

    def close(self) -> list[str]:
        for rest in self._partial.values():
            self.line(rest)
        self._partial.clear()
        return list(self.tail)


def _failure(
    what: str, code: int | None, tail: list[str], timed_out: bool = False
) -> ClassifierFailed:
    # flux_model.jl's own one-line error, when it printed one, is the useful part.
    errors = [line for line in tail if line.startswith("flux_model: error:")]
    headline = f"{what}: {errors[-1]}" if errors else what
    return ClassifierFailed(headline, exit_code=code, log_tail=tail, timed_out=timed_out)


def _flux_args(input_dir: str, weights: str, output: str, batch_size: int) -> list[str]:
    return [
        "--input",
        input_dir,
        "--weights",
        weights,
        "--output",
        output,
        "--batch-size",
        str(batch_size),
    ]


# --- backend "local": a julia subprocess ------------------------------------------------------


def julia_dir() -> Path:
    """The repo's julia/ folder: $SYNTHFLUX_JULIA_DIR, else python/src/synthflux/../../../julia."""
    env = os.environ.get("SYNTHFLUX_JULIA_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[3] / "julia"
    if not (folder / "flux_model.jl").is_file():
        raise ClassifyError(
            f"no flux_model.jl in {folder}: set SYNTHFLUX_JULIA_DIR to the repository's julia/ "
            "folder, or use --backend docker"
        )
    return folder


def run_local(cfg: PipelineConfig, input_dir: Path, weights: Path, output: Path) -> None:
    """`julia --project=julia julia/flux_model.jl ...`, streamed, killed at the timeout."""
    jdir = julia_dir()
    exe = shutil.which(cfg.classify.julia)
    if exe is None:
        raise ClassifyError(
            f"classify.julia = {cfg.classify.julia!r} is not an executable on PATH: install "
            "Julia 1.10+, set classify.julia to its path, or use --backend docker"
        )
    args = _flux_args(str(input_dir), str(weights), str(output), cfg.classify.batch_size)
    cmd = [exe, f"--project={jdir}", str(jdir / "flux_model.jl"), *args]
    log.debug("classify: %s", " ".join(cmd))
    timeout = cfg.classify.timeout_s
    logs = _LogStream()
    timed_out = threading.Event()
    proc: subprocess.Popen[bytes] | None = None

    def kill() -> None:
        timed_out.set()
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # type: ignore[union-attr]

    killer = threading.Timer(timeout, kill)
    killer.daemon = True
    try:
        # Its own session: Ctrl-C reaches only us, and we kill the whole group (julia may
        # fork). An interrupt while it starts waits until `proc` is set, so it is never lost.
        with _deferred_interrupts():
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        killer.start()
        assert proc.stdout is not None
        for raw in proc.stdout:
            logs.feed(raw)
        code = proc.wait()
    finally:
        killer.cancel()
        if proc is not None:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    tail = logs.close()
    if timed_out.is_set():
        raise _failure(
            f"julia timed out after {timeout}s (classify.timeout_s) and was killed",
            code,
            tail,
            True,
        )
    if code != 0:
        raise _failure(f"julia exited with code {code}", code, tail)


# --- backend "docker": one container for all shards ------------------------------------------


def _docker_client() -> Any:
    import docker

    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise ClassifyError(
            f"cannot reach the Docker daemon at {where}: start Docker (or .ci/start-docker.sh), "
            f"or set DOCKER_HOST to a running one; or use --backend local ({e})"
        ) from None
    return client


def _require_image(client: Any, image: str) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ClassifyError(
            f"Docker image {image!r} not found: run `make images` (or `docker build -f "
            f"docker/julia.Dockerfile -t {image} .`), or pass --image TAG"
        ) from None


def container_user() -> tuple[int, int]:
    """Who the classifier runs as: the invoking user, never root (then nobody)."""
    uid, gid = os.getuid(), os.getgid()
    return (uid, gid) if uid != 0 else NOBODY


def run_reference(ds: Dataset, input_dir: Path, weights: Path, output: Path) -> None:
    """The PyTorch twin of the Flux CNN (synthflux.reference), same files in and out."""
    from synthflux import reference
    from synthflux.progress import Progress

    loaded = reference.load_weights(weights)
    with Progress("classify (reference)", ds.images) as progress:
        for shard in ds.shards:
            reference.predict_shard(input_dir / shard.file, loaded, output)
            progress.update(len(shard.ids))


def collect_existing(ds: Dataset, out: Path, staging: Path) -> None:
    """Backend "none": take the probabilities already in DATA/predictions, e.g. written by
    compose's julia service; they are checked like any classifier's output."""
    for shard in ds.shards:
        src = out / shard.probs_file
        if not src.is_file():
            raise ClassifyError(
                f"{src} not found: backend 'none' only collects outputs that the classifier "
                "already wrote (run the julia service or another backend first)"
            )
        try:  # same file system: a link, not a copy of every file
            os.link(src, staging / shard.probs_file)
        except OSError:
            shutil.copyfile(src, staging / shard.probs_file)


def _readable_by(path: Path, uid: int, gid: int, bits: int = 0o4) -> bool:
    """Whether uid:gid has all of `bits` (0o4 read, 0o5 read+search) on path, by its mode."""
    st = path.stat()
    shift = 6 if uid == st.st_uid else 3 if gid == st.st_gid else 0
    return (st.st_mode >> shift) & bits == bits


def _check_readable(paths: list[Path], dirs: list[Path], user: tuple[int, int]) -> None:
    """Fail before starting when the container user could not read its inputs."""
    for path, bits in [*((p, 0o4) for p in paths), *((d, 0o5) for d in dirs)]:
        if not _readable_by(path, *user, bits=bits):
            mode = oct(path.stat().st_mode & 0o777)
            folder = path if path.is_dir() else path.parent
            raise ClassifyError(
                f"{path} (mode {mode}) is not readable by the container user {user[0]}:{user[1]}: "
                f"run `chmod -R a+rX {folder}`"
            )


def _out_dir_tar(user: tuple[int, int]) -> bytes:
    """A tar holding the empty output folder, for put_archive into /out before start."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(Path(VOLUME_PREDICTIONS).name)
        # 0777 too, in case the engine does not keep the tar's owner: no one else is in there.
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o777, *user
        tar.addfile(info)
    return buf.getvalue()


def _copy_out(container: Any, staging: Path, wanted: set[str]) -> None:
    """Volume mode: fetch the classifier's outputs from its /out volume into staging."""
    chunks, _ = container.get_archive(VOLUME_PREDICTIONS)
    with tempfile.TemporaryFile(dir=staging) as buf:
        for chunk in chunks:
            buf.write(chunk)
        buf.seek(0)
        with tarfile.open(fileobj=buf, mode="r:") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted:  # nothing else, no paths from the tar
                    src = tar.extractfile(member)
                    assert src is not None
                    with atomic_write(staging / name) as dst:
                        shutil.copyfileobj(src, dst)


@dataclass(frozen=True)
class _ContainerPlan:
    mounts: list[Any]
    command: list[str]
    copy_back: bool


def _plan_container(
    cfg: PipelineConfig,
    client: Any,
    ds: Dataset,
    weights: Path,
    staging: Path,
    user: tuple[int, int],
) -> _ContainerPlan:
    import docker
    from docker.types import Mount

    root = cfg.data_root.resolve()
    prep = preprocessed_dir(cfg).resolve()
    inputs = [s.path.resolve() for s in ds.shards]
    bs = cfg.classify.batch_size
    volume = cfg.classify.volume
    if not volume:
        _check_readable([*inputs, weights.resolve()], [prep], user)
        mounts = [
            Mount(f"{DATA_MOUNT}/preprocessed", str(prep), type="bind", read_only=True),
            Mount(
                f"{DATA_MOUNT}/model/weights.npz",
                str(weights.resolve()),
                type="bind",
                read_only=True,
            ),
            Mount(f"{DATA_MOUNT}/predictions", str(staging.resolve()), type="bind"),
        ]
        command = _flux_args(
            f"{DATA_MOUNT}/preprocessed",
            f"{DATA_MOUNT}/model/weights.npz",
            f"{DATA_MOUNT}/predictions",
            bs,
        )
        return _ContainerPlan(mounts, command, copy_back=False)
    try:
        client.volumes.get(volume)
    except docker.errors.NotFound:
        raise ClassifyError(f"classify.volume = {volume!r}: no such Docker volume") from None
    try:
        rel_weights = weights.resolve().relative_to(root)
    except ValueError:
        raise ClassifyError(
            f"{weights} is not under the data root {root}: with classify.volume the weights "
            "must be on the volume"
        ) from None
    parents = [root / p for p in rel_weights.parents if str(p) != "."]
    _check_readable([*inputs, weights.resolve()], [root, prep, *parents], user)
    mounts = [
        Mount(DATA_MOUNT, volume, type="volume", read_only=True),
        Mount(VOLUME_OUT, None, type="volume"),  # anonymous: removed with the container
    ]
    command = _flux_args(
        f"{DATA_MOUNT}/preprocessed",
        f"{DATA_MOUNT}/{rel_weights.as_posix()}",
        VOLUME_PREDICTIONS,
        bs,
    )
    return _ContainerPlan(mounts, command, copy_back=True)


def _cpu_limit(client: Any, cpus: float) -> float:
    # The engine refuses a limit above its CPU count; a laptop with fewer cores still runs.
    available = float(client.info().get("NCPU") or cpus)
    if cpus > available:
        log.info(
            "classify: classify.cpus = %g but the engine has %g CPUs; using %g",
            cpus,
            available,
            available,
        )
    return min(cpus, available)


def run_docker(cfg: PipelineConfig, ds: Dataset, weights: Path, staging: Path, image: str) -> None:
    """Create, attach, start, wait for and always remove one container that classifies all shards."""
    import docker
    import requests

    client = _docker_client()
    name = f"synthflux-classify-{uuid.uuid4().hex[:12]}"
    container = None
    try:
        _require_image(client, image)
        _remove_leftovers(client, cfg)
        user = container_user()
        plan = _plan_container(cfg, client, ds, weights, staging, user)
        if os.geteuid() == 0 and not plan.copy_back:
            os.chown(staging, *user)  # the bind-mounted output must be writable for nobody
        cpus = _cpu_limit(client, cfg.classify.cpus)
        threads = str(max(1, int(cpus)))
        container = client.containers.create(
            image,
            command=plan.command,
            name=name,
            user=f"{user[0]}:{user[1]}",
            network_mode="none",
            cap_drop=["ALL"],
            # Nothing in the image is writable; /tmp is a tmpfs (Julia's scratch depot).
            read_only=True,
            tmpfs={"/tmp": ""},
            security_opt=["no-new-privileges"],
            mem_limit=cfg.classify.memory,
            memswap_limit=cfg.classify.memory,  # no swap on top of the memory limit
            nano_cpus=int(cpus * 1e9),
            mounts=plan.mounts,
            labels={
                **dict(label.split("=", 1) for label in _labels_of(cfg)),
                "synthflux.run": name,
            },
            # BLAS and Julia would otherwise size their thread pools by the host's cores.
            environment={"JULIA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads},
            detach=True,
        )
        if plan.copy_back:
            container.put_archive(VOLUME_OUT, _out_dir_tar(user))
        log.info("classify: container %s (%s) over %d shards", name, image, len(ds.shards))
        code, tail, timed_out = _run_container(container, cfg.classify.timeout_s)
        if timed_out:
            raise _failure(
                f"the classifier container timed out after {cfg.classify.timeout_s}s "
                "(classify.timeout_s) and was killed", code, tail, True,
            )  # fmt: skip
        if code != 0:
            container.reload()
            oom = container.attrs.get("State", {}).get("OOMKilled")
            why = f" (out of memory: classify.memory = {cfg.classify.memory})" if oom else ""
            raise _failure(f"the classifier container exited with code {code}{why}", code, tail)
        if plan.copy_back:
            _copy_out(container, staging, {s.probs_file for s in ds.shards})
    except docker.errors.APIError as e:
        raise ClassifyError(f"Docker refused: {e.explanation or e}") from None
    except (docker.errors.DockerException, requests.RequestException) as e:
        raise ClassifyError(f"lost the Docker daemon during the run: {e}") from None
    finally:
        _remove_container(client, container, name)
        client.close()


def _run_container(container: Any, timeout: int) -> tuple[int, list[str], bool]:
    """Attach, start, stream its log, kill it at the timeout: (exit code, last lines, timed out)."""
    import docker
    import requests

    # Attach before start, as `docker run` does, so no early line is lost.
    stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with suppress(docker.errors.DockerException, requests.RequestException):
            container.kill()

    killer = threading.Timer(timeout, kill)
    killer.daemon = True
    logs = _LogStream()
    try:
        container.start()
        killer.start()
        for out, err in stream:  # ends when the container stops
            logs.feed(out, "out")
            logs.feed(err, "err")
        code = int(container.wait(timeout=60)["StatusCode"])
    finally:
        killer.cancel()
    # Docker keeps the order within stdout and within stderr, not between the two.
    tail = logs.close() or container.logs(tail=TAIL_LINES).decode(errors="replace").splitlines()
    return code, tail, timed_out.is_set()


def _labels_of(cfg: PipelineConfig) -> list[str]:
    return [f"{LABEL}=classify", f"synthflux.data_root={cfg.data_root.resolve()}"]


def _remove_leftovers(client: Any, cfg: PipelineConfig) -> None:
    """A driver killed outright (SIGKILL, power loss) cannot remove its container: do it now.
    One classify per data root at a time; a second one would overwrite the same outputs."""
    for old in client.containers.list(all=True, filters={"label": _labels_of(cfg)}):
        log.warning("classify: removing container %s left by an earlier run", old.name)
        old.remove(force=True, v=True)


def _remove_container(client: Any, container: Any, name: str) -> None:
    """Kill and remove it, whatever happened; by name if create() was interrupted."""
    import docker
    import requests

    with suppress(docker.errors.DockerException, requests.RequestException):
        (container or client.containers.get(name)).remove(force=True, v=True)


# --- reading back and checking the outputs ---------------------------------------------------


def check_output(path: Path, shard: Shard, n_classes: int) -> np.ndarray:
    """The (N, K) probabilities of one shard, or a ClassifyError naming the shard."""

    def bad(problem: str) -> ClassifyError:
        return ClassifyError(f"classifier output for {shard.file} ({path.name}): {problem}")

    if not path.is_file():
        raise bad("missing: the classifier did not write it")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"probs", "ids"} <= set(z.files):
                raise bad(f"needs arrays probs and ids, has {sorted(z.files)}")
            probs, ids = z["probs"], z["ids"]
    except ClassifyError:
        raise
    except Exception as e:  # zipfile, numpy and OS errors all mean "not a readable .npz"
        raise bad(f"not a readable .npz ({type(e).__name__}: {e})") from None
    n = len(shard.ids)
    if probs.dtype != np.float32 or probs.shape != (n, n_classes):
        raise bad(f"probs must be float32 ({n}, {n_classes}), got {probs.dtype} {probs.shape}")
    if not np.isfinite(probs).all():
        raise bad("probs has NaN or infinite values")
    if (probs < 0).any():
        raise bad("probs has negative values")
    # initial=0: a shard whose every image was rejected has no rows, which is fine.
    worst = float(np.abs(probs.astype(np.float64).sum(axis=1) - 1.0).max(initial=0.0))
    if worst > SUM_TOLERANCE:
        raise bad(
            f"rows of probs must sum to 1 (within {SUM_TOLERANCE}), worst is off by {worst:.3g}"
        )
    if ids.dtype != np.int64 or ids.shape != (n,):
        raise bad(f"ids must be int64 ({n},), got {ids.dtype} {ids.shape}")
    if not np.array_equal(ids, shard.ids):
        first = int(np.flatnonzero(ids != shard.ids)[0])
        raise bad(f"ids differ from the shard's at row {first}: {ids[first]} != {shard.ids[first]}")
    return probs


# --- the stage --------------------------------------------------------------------------------


@dataclass
class ClassifySummary:
    backend: str
    image: str | None
    classes: list[str]
    images: int
    shards: int
    correct: int
    confusion: list[list[int]]
    classifier_seconds: float
    seconds: float
    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    def lines(self) -> list[str]:
        where = {
            "docker": f"docker image {self.image}",
            "local": "local julia",
            "reference": "the PyTorch reference",
            "none": "outputs already in place",
        }[self.backend]
        rate = self.images / max(self.classifier_seconds, 1e-9)
        width = max(len(c) for c in self.classes)
        out = [
            f"classified {self.images} images in {self.shards} shards with {where} in "
            f"{self.classifier_seconds:.1f}s ({rate:.1f} img/s)",
            f"accuracy against the prompt labels: {self.accuracy:.3f} ({self.correct}/{self.images})",
            "confusion matrix (rows: prompt class, columns: predicted class):",
            " " * (width + 2) + " ".join(f"{c:>{max(len(c), 5)}}" for c in self.classes),
        ]
        for name, row in zip(self.classes, self.confusion, strict=True):
            cells = " ".join(
                f"{v:>{max(len(c), 5)}}" for c, v in zip(self.classes, row, strict=True)
            )
            out.append(f"  {name:<{width}} {cells}")
        out.append(f"wrote {self.out_dir / 'predictions.csv'} and summary.json")
        return out


class _SignalGuard:
    """SIGINT and SIGTERM raise KeyboardInterrupt, or wait while `deferring` is set."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)


_GUARD: _SignalGuard | None = None


@contextmanager
def _interrupts() -> Iterator[None]:
    """While the classifier runs, SIGTERM (docker stop, CI timeouts, kill) cleans up like Ctrl-C
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
def _deferred_interrupts() -> Iterator[None]:
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


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh private folder for this run's raw outputs, removed afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".classify-*"):  # left by a driver that was killed outright
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".classify-"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path, ds: Dataset) -> None:
    owner = out.stat()
    for shard in ds.shards:
        dest = out / shard.probs_file
        os.replace(staging / shard.probs_file, dest)
        if os.geteuid() == 0 and dest.stat().st_uid != owner.st_uid:
            os.chown(dest, owner.st_uid, owner.st_gid)  # written by nobody in the container


def _stage_timing(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("classify: ignoring unreadable %s (%s)", path, e)
        return None
    return record if isinstance(record, dict) else None


def _write_predictions(
    path: Path, ds: Dataset, records: dict[int, dict[str, Any]], probs: dict[str, np.ndarray]
) -> None:
    header = ["id", "name", "class", "label", "prompt", "seed", "file"]
    header += [f"p_{c}" for c in ds.classes] + ["predicted"]
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for shard in ds.shards:
            p = probs[shard.file]
            for row, image_id in enumerate(shard.ids.tolist()):
                rec = records[image_id]
                writer.writerow(
                    [image_id, rec.get("name", ""), ds.classes[int(shard.labels[row])],
                     int(shard.labels[row]), rec.get("prompt", ""), rec.get("seed", ""),
                     rec.get("file", ""), *(f"{v:.6f}" for v in p[row].tolist()),
                     ds.classes[int(p[row].argmax())]]
                )  # fmt: skip


def classify(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> ClassifySummary:
    """Run the classifier over every shard, check its outputs, write the predictions and report."""
    started = time.monotonic()
    backend = backend or cfg.classify.backend
    if backend not in BACKENDS:
        raise ClassifyError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    image = (image or cfg.classify.image) if backend == "docker" else None
    ds = load_dataset(cfg)
    inputs = _inputs(cfg)
    records = join_manifest(cfg, ds)
    weights = ensure_weights(cfg, ds)
    out = predictions_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage.json").unlink(missing_ok=True)  # not done until this run says so

    with _staging(out) as staging, _interrupts():
        run_start = time.monotonic()
        if backend == "docker":
            assert image is not None
            run_docker(cfg, ds, weights, staging, image)
        elif backend == "local":
            run_local(cfg, preprocessed_dir(cfg), weights, staging)
        elif backend == "reference":
            run_reference(ds, preprocessed_dir(cfg), weights, staging)
        else:
            collect_existing(ds, out, staging)
        classifier_seconds = time.monotonic() - run_start
        k = len(ds.classes)
        probs = {s.file: check_output(staging / s.probs_file, s, k) for s in ds.shards}
        _publish(staging, out, ds)

    labels = np.concatenate([s.labels for s in ds.shards])
    all_probs = np.concatenate([probs[s.file] for s in ds.shards])
    predicted = all_probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    correct = int(np.trace(confusion))
    counts = {c: int((labels == i).sum()) for i, c in enumerate(ds.classes)}
    mean_probs = {
        c: ({d: float(all_probs[labels == i, j].mean()) for j, d in enumerate(ds.classes)}
            if counts[c] else None)
        for i, c in enumerate(ds.classes)
    }  # fmt: skip

    _write_predictions(out / "predictions.csv", ds, records, probs)
    seconds = time.monotonic() - started
    timings: dict[str, Any] = {}
    for stage, folder in (("generate", "generated"), ("preprocess", "preprocessed")):
        if (timing := _stage_timing(cfg.data_root / folder / "stage.json")) is not None:
            timings[stage] = timing
    timings["classify"] = {
        "stage": "classify",
        "seconds": seconds,
        "classifier_seconds": classifier_seconds,
    }
    write_json_atomic(
        out / "summary.json",
        {
            "images": len(labels),
            "shards": len(ds.shards),
            "classes": ds.classes,
            "counts": counts,
            "predicted_counts": {c: int((predicted == i).sum()) for i, c in enumerate(ds.classes)},
            "correct": correct,
            "accuracy": correct / len(labels) if len(labels) else None,
            "confusion_matrix": {
                "rows": "prompt class",
                "columns": "predicted class",
                "classes": ds.classes,
                "matrix": confusion.tolist(),
            },
            "mean_probabilities": mean_probs,
            "timings": timings,
            "backend": backend,
            "image": image,
            "weights": str(weights),
        },
    )
    summary = ClassifySummary(
        backend, image, ds.classes, len(labels), len(ds.shards), correct, confusion.tolist(),
        classifier_seconds, seconds, out, counts,
    )  # fmt: skip
    write_json_atomic(
        out / "stage.json",
        {
            "stage": "classify",
            "seconds": seconds,
            "classifier_seconds": classifier_seconds,
            "images": summary.images,
            "shards": summary.shards,
            "accuracy": summary.accuracy,
            "backend": backend,
            "image": image,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs,
        },
    )
    return summary


def _inputs(cfg: PipelineConfig) -> list[list[str]]:
    """The shards (file, sha256) as dataset.json lists them: what the predictions belong to."""
    return [[str(s["file"]), str(s["sha256"])] for s in read_dataset(cfg)["shards"]]


def is_current(cfg: PipelineConfig) -> bool:
    """True when the predictions were made from exactly the current shards' bytes, finished,
    and every probs file still passes the output checks. `run` and `status` both ask this."""
    out = predictions_dir(cfg)
    try:
        stage = json.loads((out / "stage.json").read_text(encoding="utf-8"))
        if stage.get("inputs") != _inputs(cfg) or not (out / "predictions.csv").is_file():
            return False
        ds = load_dataset(cfg)
        for shard in ds.shards:
            check_output(out / shard.probs_file, shard, len(ds.classes))
    except (OSError, ValueError, AttributeError, DataError, ClassifyError):
        return False
    return True
