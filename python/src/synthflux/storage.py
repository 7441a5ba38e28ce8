"""Small file helpers shared by every stage: atomic writes, hashing, shard specs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from synthflux.errors import ConfigError, DataError

log = logging.getLogger("synthflux")

# What np.load raises for a missing, truncated or non-npz file.
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)

# Temp files name their writer, so a later run can remove those a killed process left behind.
# Dots are replaced so the tag stays one dot-separated field of the temp file's name.
_HOST = socket.gethostname().replace(".", "_")
TEMP_TAG = f"{_HOST}-{os.getpid()}"
# mkstemp makes 0600 files; data files get what open() would give (the classifier container
# reads them as another, non-root user). Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


_held: dict[str, int] = {}
_held_lock = threading.Lock()


def hold_point(point: str) -> None:
    """Where tests kill a run at a moment they choose, not by racing it.

    With SYNTHFLUX_TEST_HOLD=POINT:N, the N-th pass through `point` (e.g. "image" after each
    PNG written, "shard" after each shard marker) stops this process with SIGSTOP; the test
    waits for the stop and kills it. Unset (always, outside tests) it costs one dict lookup.
    """
    spec = os.environ.get("SYNTHFLUX_TEST_HOLD")
    if not spec or spec.partition(":")[0] != point:
        return
    with _held_lock:
        _held[point] = _held.get(point, 0) + 1
        reached = _held[point] == int(spec.partition(":")[2] or 1)
    if reached:
        os.kill(os.getpid(), signal.SIGSTOP)
        # Another thread may take the stop first; this one must not go on meanwhile.
        time.sleep(1)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files and folders under `folder` left by dead processes of this host;
    return the count."""
    removed = 0
    for tmp in sorted(folder.rglob(".*.tmp"), reverse=True):  # inner ones first
        writer = tmp.name.rsplit(".", 3)[-3] if tmp.name.count(".") >= 3 else ""
        w_host, _, w_pid = writer.rpartition("-")
        if w_host != _HOST or not w_pid.isdigit() or _alive(int(w_pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, but another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def temp_path(path: Path) -> Path:
    """A private temp name beside `path`, in the pattern remove_stale_temps recognises."""
    return path.parent / f".{path.name}.{TEMP_TAG}.{secrets.token_hex(4)}.tmp"


def public_mode(path: Path, directory: bool = False) -> None:
    """What open() or mkdir() would have given, not mkstemp's/mkdtemp's private 0600/0700:
    other users (the classifier container's) read the data."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`: serialises merges by concurrent shards (also on most
    cluster file systems), released when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold a non-blocking flock on `path` for one run of `what` over a data root; if another
    process holds it, say so instead of waiting or trampling on its files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise DataError(
                f"another {what} run ({holder}) is using {path.parent}: wait for it to finish"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", durable: bool = True) -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    Readers never see a half-written file, and a crash leaves the old file intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMP_TAG}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """durable=False skips fsync: for files a resume re-verifies anyway (e.g. hashed PNGs)."""
    with atomic_write(path, "wb", durable) as f:
        f.write(data)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with atomic_write(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a malformed line is an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    """`--shard I/N`: this process handles the items whose position % N == I."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"--shard {text!r}: need 0 <= I < N and N >= 1")
        return cls(i, n)

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def hash_folder(folder: Path, cache: Path) -> str:
    """A local model's revision: the sha256 of its files' hashes.

    Hashing a multi-GB model costs seconds, so the result is cached (in `cache`, under the
    data root, never in the model folder) keyed by every file's size and mtime.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256(
        "\n".join(
            f"{f.relative_to(folder).as_posix()} {f.stat().st_size} {f.stat().st_mtime_ns}"
            for f in files
        ).encode()
    ).hexdigest()
    try:
        cached = json.loads(cache.read_text()).get(str(folder.resolve()), {})
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key:
        return str(cached["revision"])
    log.info("hashing the model files in %s (cached for later runs)", folder)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(f).encode())
    revision = "sha256:" + h.hexdigest()
    # A cache that cannot be written costs time only.
    with contextlib.suppress(OSError, ValueError), file_lock(cache.with_suffix(".lock")):
        entries = json.loads(cache.read_text()) if cache.is_file() else {}
        entries[str(folder.resolve())] = {"key": key, "revision": revision}
        write_json_atomic(cache, entries)
    return revision
