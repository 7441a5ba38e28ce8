"""Build the small Docker image the classify contract tests run: Python + NumPy + the stand-in.

No image can be pulled in CI, so the image is made from scratch: a `debootstrap
--variant=minbase` Debian rootfs with python3-numpy (cached as a tarball, the slow part), plus
tests/standin/flux_model_standin.py behind a `julia` wrapper, imported with `docker import`.
Its ENTRYPOINT mimics the real image's (see synthflux/classify.py):

    julia --project=/opt/synthflux/julia /opt/synthflux/julia/flux_model.jl

so the driver passes only flux_model.jl's own arguments as the container command.

The tag carries a hash of everything that goes into the image, so an existing tag is reused
as is and a changed stand-in gets a new one. Cache folder: $SYNTHFLUX_TEST_CACHE, else
$XDG_CACHE_HOME/synthflux-test, else ~/.cache/synthflux-test.

    python tests/docker_image.py     # build (or find) the image and print its tag
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin" / "flux_model_standin.py"
REPOSITORY = "synthflux-test-julia"
SUITE = "bookworm"
MIRROR = os.environ.get("SYNTHFLUX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3-minimal,python3-numpy"
JULIA_PROJECT = "/opt/synthflux/julia"  # the real image's layout, mimicked
ENTRYPOINT = ["julia", f"--project={JULIA_PROJECT}", f"{JULIA_PROJECT}/flux_model.jl"]
# `julia` in the test image: hands every argument to the stand-in, which skips the first two.
WRAPPER = b'#!/bin/sh\nexec python3 /opt/standin/flux_model_standin.py "$@"\n'
# Left out of the image: with the vfs storage driver every container copies the whole image,
# so each MB dropped here is saved at every create and remove.
PRUNE = (
    "usr/share/locale/", "usr/share/doc/", "usr/share/man/", "usr/share/info/",
    "usr/share/zoneinfo/", "usr/share/lintian/", "usr/share/bash-completion/", "usr/share/perl5/",
    "usr/lib/x86_64-linux-gnu/gconv/", "usr/lib/x86_64-linux-gnu/perl-base/", "usr/bin/perl",
    "var/cache/debconf/", "usr/lib/python3.11/test/", "usr/lib/python3.11/pydoc_data/",
    "usr/lib/python3/dist-packages/numpy/distutils/", "usr/lib/python3/dist-packages/numpy/f2py/",
)  # fmt: skip


class ImageBuildError(RuntimeError):
    """The test image cannot be built here (no debootstrap, not root, no mirror...)."""


def cache_dir() -> Path:
    if env := os.environ.get("SYNTHFLUX_TEST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "synthflux-test"


def rootfs_key() -> str:
    return hashlib.sha256(f"{SUITE} minbase {PACKAGES} {MIRROR}".encode()).hexdigest()[:12]


def image_tag() -> str:
    h = hashlib.sha256()
    parts = (rootfs_key(), STANDIN.read_text(), WRAPPER.decode(), repr(ENTRYPOINT), repr(PRUNE))
    for part in (p.encode() for p in parts):
        h.update(part + b"\0")
    return f"{REPOSITORY}:{h.hexdigest()[:12]}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One builder at a time per cache (parallel test sessions would debootstrap twice)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs_tarball() -> Path:
    """The debootstrapped rootfs as an uncompressed tar, built once per cache folder."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"rootfs-{SUITE}-{rootfs_key()}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed (run .ci/start-docker.sh)")
    if os.geteuid() != 0:
        raise ImageBuildError(f"debootstrap needs root; or put a prebuilt {tarball.name} there")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={PACKAGES}",
            SUITE,
            str(root),
            MIRROR,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ImageBuildError(f"debootstrap failed ({done.returncode}):\n{tail}")
        # Package caches and lists are dead weight in an image nobody runs apt in.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        partial = Path(tmp) / "rootfs.tar"
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True
        )
        os.replace(partial, tarball)
    log.warning("debootstrap rootfs built in %.0fs: %s", time.monotonic() - start, tarball)
    return tarball


def _pruned(name: str) -> bool:
    name = name.removeprefix("./")
    return name.startswith(PRUNE) or (
        name.startswith("usr/lib/python3/dist-packages/numpy/") and "/tests/" in name
    )


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    tar.addfile(info)


def ensure_image(client) -> str:
    """Return the test image's tag, building it unless the engine already has it."""
    import docker

    tag = image_tag()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    with _locked(cache_dir()):
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.get(tag)
            return tag  # another session built it while we waited
        base = rootfs_tarball()
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="image-") as tmp:
            full = Path(tmp) / "image.tar"
            with tarfile.open(base) as src, tarfile.open(full, "w") as tar:
                for member in src:
                    if _pruned(member.name) or (member.islnk() and _pruned(member.linkname)):
                        continue
                    tar.addfile(member, src.extractfile(member) if member.isfile() else None)
                for folder in ("./opt/standin", "./opt/synthflux", f".{JULIA_PROJECT}"):
                    _add_dir(tar, folder)
                _add_file(tar, "./opt/standin/flux_model_standin.py", STANDIN.read_bytes())
                _add_file(tar, "./usr/local/bin/julia", WRAPPER)
                # The path the entrypoint names, as in the real image (the stand-in skips it).
                _add_file(tar, f".{JULIA_PROJECT}/flux_model.jl", b"# stand-in image\n", 0o644)
            repo, _, version = tag.partition(":")
            client.api.import_image_from_file(
                str(full),
                repository=repo,
                tag=version,
                changes=[
                    f"ENTRYPOINT {_json_list(ENTRYPOINT)}",
                    "ENV PYTHONDONTWRITEBYTECODE=1",
                    'LABEL synthflux.test="standin"',
                ],
            )
        log.warning("test image %s imported in %.0fs", tag, time.monotonic() - start)
    client.images.get(tag)  # raises if the import silently failed
    _drop_older(client, tag)
    return tag


def _drop_older(client, keep: str) -> None:
    """Remove this repository's other tags: each is a few hundred MB under vfs."""
    import docker

    for old in client.images.list(REPOSITORY):
        if keep not in old.tags:
            with contextlib.suppress(docker.errors.APIError):  # still used by a container
                client.images.remove(old.id, force=False)


def _json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


if __name__ == "__main__":
    import docker

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        print(ensure_image(docker.from_env()))
    except ImageBuildError as e:
        sys.exit(f"docker_image: error: {e}")
    print(f"ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
