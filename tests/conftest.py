"""Shared fixtures: a tiny Stable Diffusion pipeline built once, and config files."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
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


@pytest.fixture
def write_config(tmp_path: Path, tiny_model: Path):
    """write_config(data=..., **overrides) -> (config path, validated config)."""

    def _write(
        data: Path | None = None, name: str = "pipeline.toml", **overrides: Any
    ) -> tuple[Path, PipelineConfig]:
        raw = deep_update(BASE_CONFIG, {"generate": {"model": str(tiny_model)}})
        raw = deep_update(raw, overrides)
        raw["data_root"] = str(data or tmp_path / "data")
        path = tmp_path / name
        path.write_text(tomli_w.dumps(raw))
        return path, load_config(path)

    return _write


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

    stage.json is left out: it records how long the run took.
    """
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.glob(pattern))
        if p.is_file()
        and p.name != "stage.json"
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
