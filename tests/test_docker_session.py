"""One container per run: `synthflux run` with backend "docker" sends every train and classify
job to one container running `flux_model.jl serve` (synthflux.backends.docker_serve).

Against a real Docker engine and the contract stand-in's image, as test_classify_docker.py:
the containers a run creates are counted from the engine's own events.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import test_classify_docker
from classify_data import check_success, control_standin, make_data, release_standin
from classify_data import write_config as classify_config
from test_classify_docker import containers, run_inside
from test_train import quiet, real_folder

from synthflux import classify, ingest, train
from synthflux.backends.docker import LABEL
from synthflux.backends.docker_serve import DRIVER
from synthflux.backends.serve import session
from synthflux.errors import ClassifierFailed, TrainerFailed
from synthflux.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.docker
engine, image = test_classify_docker.engine, test_classify_docker.image  # the same fixtures


def created(engine: Any, root: Path, since: int) -> list[str]:
    """The stage labels of the containers the engine created for data root `root` since then."""
    events = engine.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"type": "container", "event": "create",
                 "label": f"synthflux.data_root={root.resolve()}"},
    )  # fmt: skip
    return [e["Actor"]["Attributes"][LABEL] for e in events]


def wait_for(found: Callable[[], Any], seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := found()):
        assert time.monotonic() < deadline, "not there after 60 s"
        time.sleep(0.05)
    return result


def test_a_run_uses_one_container_for_training_and_every_source(
    write_config: Any, image: str, engine: Any, tmp_path: Path
) -> None:
    _, cfg = write_config(
        cnn={"backend": "docker", "image": image, "memory": "512m", "cpus": 1.0},
        train={"epochs": 2},
    )
    ingest.run(cfg, real_folder(tmp_path / "photos"), split="test", name="photos")
    since = int(time.time())
    summaries = run_pipeline(cfg, say=quiet)
    names = [type(s).__name__ for s in summaries]
    assert names[-4:] == ["TrainSummary", "ClassifySummary", "EvaluateSummary", "ReportSummary"]
    assert created(engine, cfg.data_root, since) == ["serve"]
    result = json.loads((cfg.data_root / "evaluation" / "summary.json").read_text())
    assert result["splits"]["photos"]["images"] == 12  # both sources were classified
    assert (cfg.data_root / "model" / "weights.npz").is_file()
    filters = {"label": f"synthflux.data_root={cfg.data_root.resolve()}"}
    assert engine.containers.list(all=True, filters=filters) == []


def test_the_server_container_is_sealed_off_and_outlives_a_failed_job(
    tmp_path: Path, image: str, engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fx = make_data(tmp_path / "data")
    _, cfg = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image)
    since = int(time.time())
    with session():
        control_standin(fx, fail_epoch=2)
        with pytest.raises(TrainerFailed, match="julia exited with code 3 in the server container"):
            train.run(cfg)
        # the failed job's checkpoint came out of the container: the next run resumes from it
        assert (fx.root / "training" / "run" / "checkpoint.npz").is_file()
        [container] = containers(engine, fx, running_only=True, stage="serve")
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert set(mounts) == {"/data", "/out"}
        data, out = mounts["/data"], mounts["/out"]
        assert (data["Type"], data["Source"], data["RW"]) == ("bind", str(fx.root.resolve()), False)
        assert out["Type"] == "volume" and out["RW"]
        host = container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none" and host["CapDrop"] == ["ALL"]
        assert host["ReadonlyRootfs"] and container.attrs["Config"]["User"] != "0:0"
        code, said = run_inside(container, "touch", "/data/preprocessed/synthetic/intruder")
        assert code != 0 and "Read-only file system" in said
        control_standin(fx)
        with caplog.at_level("INFO", logger="synthflux"):
            summary = train.run(cfg)
        assert summary.complete and len(summary.epochs) == cfg.train.epochs
        assert "julia | resume: from epoch 1" in caplog.messages
        check_success(fx, classify.run(cfg))
    assert created(engine, fx.root, since) == ["serve"]
    assert containers(engine, fx, stage="serve") == []


def test_a_timeout_or_a_crash_removes_the_container_and_the_next_job_starts_one(
    tmp_path: Path, image: str, engine: Any
) -> None:
    fx = make_data(tmp_path / "data")
    _, cfg = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image,
                             timeout_s=2)  # fmt: skip
    since = int(time.time())
    with session():
        control_standin(fx, hang=True)
        with pytest.raises(ClassifierFailed, match=r"timed out after 2s \(cnn.timeout_s\)") as err:
            classify.run(cfg)
        assert err.value.timed_out and "flux_model: hanging as asked" in err.value.log_tail
        assert containers(engine, fx, stage="serve") == []
        control_standin(fx, crash=True)
        with pytest.raises(ClassifierFailed, match=r"exited with code 9 during the job") as err:
            classify.run(cfg)
        assert err.value.exit_code == 9
        assert "flux_model: the server crashes as asked" in err.value.log_tail
        control_standin(fx)
        check_success(fx, classify.run(cfg))
    assert created(engine, fx.root, since) == ["serve"] * 3
    assert containers(engine, fx, stage="serve") == []


def test_weights_outside_the_data_root_take_a_one_shot_container(
    tmp_path: Path, image: str, engine: Any
) -> None:
    fx = make_data(tmp_path / "data")
    outside = tmp_path / "elsewhere" / "weights.npz"
    outside.parent.mkdir()
    _, cfg = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image)
    outside.write_bytes((fx.root / "model" / "weights.npz").read_bytes())
    _, cfg = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image,
                             weights=str(outside))  # fmt: skip
    since = int(time.time())
    with session():
        check_success(fx, classify.run(cfg))
    assert created(engine, fx.root, since) == ["classify"]


def test_a_dead_drivers_server_container_is_removed_a_live_ones_kept(
    tmp_path: Path, image: str, engine: Any
) -> None:
    fx = make_data(tmp_path / "data")
    _, cfg = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image)
    labels = {LABEL: "serve", "synthflux.data_root": str(fx.root.resolve())}
    here = socket.gethostname()
    dead = engine.containers.create(
        image, ["--help"], labels={**labels, DRIVER: f"{here}:999999999"}
    )
    away = engine.containers.create(image, ["--help"], labels={**labels, DRIVER: "other-host:1"})
    try:
        with session():
            check_success(fx, classify.run(cfg))
        with pytest.raises(docker.errors.NotFound):
            dead.reload()
        away.reload()  # another host's driver may be alive: not ours to remove
    finally:
        away.remove(force=True)


def test_an_interrupt_removes_the_container_and_keeps_the_checkpoint(
    tmp_path: Path, image: str, engine: Any
) -> None:
    """Ctrl-C in the middle of a served training job: the container is removed, and what the
    trainer had written (its checkpoint) is copied out for the next run."""
    fx = make_data(tmp_path / "data")
    path, _ = classify_config(tmp_path, fx.root, fx.classes, backend="docker", image=image)
    control_standin(fx, hold_epoch=2)
    served = (
        "import sys; from synthflux import train; from synthflux.config import load_config; "
        "from synthflux.backends.serve import session\n"
        "with session(): train.run(load_config(sys.argv[1]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", served, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    checkpoint = fx.root / "training" / "run" / "checkpoint.npz"
    try:
        [container] = wait_for(lambda: containers(engine, fx, running_only=True, stage="serve"))
        wait_for(lambda: "checkpoint.npz" in run_inside(container, "ls", "/out/job-1")[1])
        assert not checkpoint.exists()  # so far only in the container
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        release_standin(fx)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert containers(engine, fx, stage="serve") == []
    assert checkpoint.is_file()
