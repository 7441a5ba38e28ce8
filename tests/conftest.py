"""Shared fixtures: a tiny Stable Diffusion pipeline built once, and config files."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from synthflux.config import PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]

BASE_CONFIG: dict[str, Any] = {
    "seed": 7,
    "images_per_class": 4,
    "style": "studio photo",
    "negative_prompt": "blurry",
    "classes": [
        {
            "name": "cat",
            "prompts": ["a {color} cat", "a cat asleep"],
            "variables": {"color": ["black", "white"]},
        },
        {"name": "dog", "prompts": ["a dog in a park"]},
    ],
    "generate": {"model": "tiny", "steps": 2, "width": 32, "height": 32, "batch_size": 3},
    "preprocess": {"width": 16, "height": 16, "shard_size": 3},
}


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it, for this process and every child it starts: a runner
    that starts the tests as a background job of a non-interactive shell (CI's, `make test &`)
    passes SIGINT on ignored, a child inherits that across exec, and Python then never raises
    KeyboardInterrupt there -- the SIGINT cases of the interrupt tests exited 0 (issue 27)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])


@pytest.fixture(autouse=True)
def signals_as_they_were():
    """A test must leave Ctrl-C as it found it: a child inherits an ignored or blocked SIGINT
    (Python then never raises KeyboardInterrupt there), so a later test's Ctrl-C of a child
    would do nothing. Checked after every test, so the one that leaks it is the one that fails."""
    yield
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    assert handler is signal.default_int_handler, f"the test left SIGINT's handler {handler!r}"
    assert not {signal.SIGINT, signal.SIGTERM} & blocked, f"the test left {blocked} blocked"


def unavailable(reason: str) -> None:
    """Skip a test whose infrastructure is missing, except in CI, which must provide it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this must work (see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_engine():
    """A docker-py client of a running engine (.ci/start-docker.sh starts one)."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        unavailable(f"no Docker engine answers ({e})")
    yield client
    client.close()


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, saved once per test session with save_pretrained."""
    from synthflux.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def save_config(path: Path, raw: dict[str, Any]) -> tuple[Path, PipelineConfig]:
    """Write `raw` as TOML to `path`; return it with its validated config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    return path, load_config(path)


def mark_generated(cfg: PipelineConfig, seconds: float = 0.0) -> None:
    """Write generate's done marker for the manifest a test wrote by hand, as generate would."""
    from synthflux import lineage
    from synthflux.records import plan_key

    lineage.record(cfg, "generate", key=plan_key(cfg), seconds=seconds,
                   outputs=[cfg.layout.manifest])  # fmt: skip


def mark_preprocessed(cfg: PipelineConfig, seconds: float = 0.0) -> None:
    """Write preprocess's done markers for the dataset.json files a test wrote by hand."""
    from synthflux import lineage
    from synthflux.preprocess import dataset_key, key
    from synthflux.sources import all_sources
    from synthflux.stages import write_stage_marker
    from synthflux.storage import sha256_file

    layout = cfg.layout
    for source in all_sources(cfg):
        prepared = layout.prepared(source.name)
        facts = {"dataset_sha256": sha256_file(prepared.dataset), "source": source.name}
        write_stage_marker(prepared.stage_marker, "preprocess", key=dataset_key(cfg, source),
                           seconds=seconds, complete=True, facts=facts)  # fmt: skip
    datasets = [layout.prepared(s.name).dataset for s in all_sources(cfg)]
    lineage.record(cfg, "preprocess", key=key(cfg), seconds=seconds, outputs=datasets)


def tiny_config(
    folder: Path, data: Path, model: Path, name: str = "pipeline.toml", **overrides: Any
) -> tuple[Path, PipelineConfig]:
    """BASE_CONFIG on the tiny model, with `overrides`, saved as folder/name."""
    raw = deep_update(BASE_CONFIG, {"generate": {"model": str(model)}})
    raw = deep_update(raw, overrides)
    raw["data_root"] = str(data)
    return save_config(folder / name, raw)


@pytest.fixture
def write_config(tmp_path: Path, tiny_model: Path):
    """write_config(data=..., **overrides) -> (config path, validated config)."""

    def _write(
        data: Path | None = None, name: str = "pipeline.toml", **overrides: Any
    ) -> tuple[Path, PipelineConfig]:
        return tiny_config(tmp_path, data or tmp_path / "data", tiny_model, name, **overrides)

    return _write


def run_until_held(
    args: list[str], hold: str, timeout: float = 120, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """Start `python -m synthflux ARGS` with SYNTHFLUX_TEST_HOLD=hold and return it once it
    has stopped itself there (storage.hold_point): the test then kills it at that moment.
    It runs in a process group of its own (with its workers), as a shell would start it."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "synthflux", *args], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=stderr, env={**os.environ, "SYNTHFLUX_TEST_HOLD": hold}, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.poll() is None, f"the run ended before reaching {hold}"
        assert time.monotonic() < deadline, f"the run did not reach {hold} in {timeout} s"
        time.sleep(0.02)
    return proc


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `python -m synthflux ARGS` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "synthflux", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def tree_bytes(root: Path, pattern: str = "**/*") -> dict[str, bytes]:
    """Every visible file under root (relative path -> bytes), to compare two runs exactly.

    stage.json and the trainer's checkpoint.npz are left out: they record how long the run
    took.
    """
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.glob(pattern))
        if p.is_file()
        and p.name not in ("stage.json", "checkpoint.npz")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
