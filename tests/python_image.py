"""Build docker/python.Dockerfile here, where no base image can be pulled, for the container tests.

The base is a plain Debian bookworm image made locally: the debootstrapped rootfs that
tests/docker_image.py caches for the classify stand-in image, imported with `docker import`
(its extra python3-numpy is harmless: the Dockerfile's INSTALL_PYTHON=1 path installs Python
with apt and uses an isolated venv). pip inside the build gets every package from a wheelhouse
that pip on this machine downloads once (cached) and that is served to the build over
loopback as its index (the build runs with the host's network): so torch is this machine's
CPU wheel -- `pip install torch` in the build would fetch a multi-GB CUDA build -- and the
build needs no TLS trust of its own for whatever proxy sits between this machine and PyPI.

    python tests/python_image.py [--no-cache]    # build the image, print the time it took
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.server
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import docker_image

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "python.Dockerfile"
TAG = "synthflux-test-python:local"
BASE_REPOSITORY = "synthflux-test-debian"
PYPROJECT = REPO / "python" / "pyproject.toml"
# The torch the image gets: this machine's CPU build (what `make venv` installs), never PyPI's.
TORCH = os.environ.get("SYNTHFLUX_TEST_TORCH", "torch==2.13.0+cpu")
# What pip needs to build the package itself (pyproject's [build-system] requires, plus wheel).
BUILD_REQUIRES = ["setuptools>=68", "wheel"]
BUILD_TIMEOUT_S = 3600


class BuildError(RuntimeError):
    """The image cannot be built here (no wheel, no rootfs, or `docker build` failed)."""


def base_image(client) -> str:
    """A plain Debian image from docker_image's cached rootfs (built once, then reused)."""
    import docker

    tag = f"{BASE_REPOSITORY}:{docker_image.rootfs_key()}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    with docker_image._locked(docker_image.cache_dir()):
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.get(tag)
            return tag
        try:
            tarball = docker_image.rootfs_tarball()
        except docker_image.ImageBuildError as e:
            raise BuildError(str(e)) from None
        repo, _, version = tag.partition(":")
        client.api.import_image_from_file(str(tarball), repository=repo, tag=version)
    client.images.get(tag)
    return tag


def _requirements() -> list[str]:
    import tomllib

    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return [TORCH, *deps, *BUILD_REQUIRES]


def wheelhouse() -> Path:
    """Every package the image's pip installs, downloaded once by this machine's pip."""
    reqs = _requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    cache = docker_image.cache_dir()
    folder = cache / f"wheelhouse-{key}"
    if folder.is_dir():
        return folder
    with docker_image._locked(cache):
        if folder.is_dir():
            return folder
        start = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache, prefix="wheelhouse-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", tmp, *reqs]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                raise BuildError(
                    f"pip download {TORCH} and the package's requirements failed:\n{tail}"
                )
            os.replace(tmp, folder)
        log.warning("wheelhouse downloaded in %.0fs: %s", time.monotonic() - start, folder)
    return folder


def _bind(handler: type, key: str) -> http.server.ThreadingHTTPServer:
    """A server on a port fixed by `key`: the index URL is a build arg, and build args are part
    of the layer cache key, so a new port per run would rebuild every layer every time."""
    first = 20000 + int(hashlib.sha256(key.encode()).hexdigest(), 16) % 20000
    for port in range(first, first + 20):
        with contextlib.suppress(OSError):
            return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a cold build, still works


@contextlib.contextmanager
def serve_index(folder: Path) -> Iterator[str]:
    """`folder` as a package index on 127.0.0.1: every project page lists every file in it
    (pip keeps the links whose names match the project), and the files are served as is."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    page = "".join(
        f'<a href="/files/{urllib.parse.quote(n)}">{html.escape(n)}</a>\n' for n in files
    )
    body = f"<!DOCTYPE html><html><body>\n{page}</body></html>".encode()

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = urllib.parse.unquote(self.path.removeprefix("/files/"))
            if self.path.startswith("/files/") and name in files:
                self.send_response(200)
                self.send_header("Content-Length", str((folder / name).stat().st_size))
                self.end_headers()
                with open(folder / name, "rb") as f:
                    shutil.copyfileobj(f, self.wfile)
            elif self.path.endswith("/"):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = _bind(Index, folder.name)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _image_id(client, tag: str) -> str | None:
    import docker

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def build(client, tag: str = TAG, *, no_cache: bool = False) -> float:
    """Build the image (with the layer cache unless no_cache); return the seconds it took."""
    import docker

    base = base_image(client)
    before = _image_id(client, tag)
    with serve_index(wheelhouse()) as url:
        cmd = [
            "docker", "build", "--network", "host", "-f", str(DOCKERFILE), "-t", tag,
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", "INSTALL_PYTHON=1",
            "--build-arg", f"TORCH={TORCH}",
            "--build-arg", f"PIP_INDEX_URL={url}",
            *(["--no-cache"] if no_cache else []),
            str(REPO),
        ]  # fmt: skip
        # The classic builder: this engine's CLI may lack buildx, and it needs no extra parts.
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        start = time.monotonic()
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S, check=False
        )
        seconds = time.monotonic() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise BuildError(f"docker build failed ({done.returncode}) after {seconds:.0f}s:\n{tail}")
    log.warning("built %s in %.0fs", tag, seconds)
    if before is not None and before != _image_id(client, tag):
        # The replaced build is untagged now; with the vfs storage driver it holds gigabytes.
        with contextlib.suppress(docker.errors.DockerException):
            client.images.remove(before)
    return seconds


if __name__ == "__main__":
    import docker

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        took = build(docker.from_env(), no_cache="--no-cache" in sys.argv[1:])
    except BuildError as e:
        sys.exit(f"python_image: error: {e}")
    print(f"{TAG} built in {took:.1f}s")
