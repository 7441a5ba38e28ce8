"""classify with backend "docker", against a real Docker engine: a CONTRACT TEST of the driver.

The container runs tests/standin/flux_model_standin.py (Python + NumPy implementing
flux_model.jl's command line and files) in a small image built by tests/docker_image.py, not
the real Julia image: these tests pin what the driver does with the engine -- mounts, user,
isolation, streaming, errors, cleanup -- and what it makes of the classifier's files.

They must run in CI (.ci/start-docker.sh gives the engine): with env CI set, a missing engine
or image is a failure; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
from classify_data import (
    Fixture,
    check_success,
    control_standin,
    make_data,
    release_standin,
    write_config,
)
from docker_image import ImageBuildError, ensure_image

from conftest import unavailable
from synthflux import classify, lineage
from synthflux.backends.docker import LABEL
from synthflux.config import PipelineConfig
from synthflux.errors import ClassifierFailed, ClassifyError, TrainerFailed

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def engine(docker_engine: Any) -> Any:
    return docker_engine


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    try:
        return ensure_image(engine)
    except ImageBuildError as e:
        unavailable(f"cannot build the stand-in image: {e}")
        raise


Setup = Callable[..., tuple[Fixture, Path, PipelineConfig]]


@pytest.fixture
def setup(tmp_path: Path, image: str) -> Setup:
    """setup(**settings) -> (fixture data, config path, config) using the stand-in image."""
    fx = make_data(tmp_path / "data")

    def _setup(**more: Any) -> tuple[Fixture, Path, PipelineConfig]:
        settings = {"backend": "docker", "image": image, **more}
        path, cfg = write_config(tmp_path, fx.root, fx.classes, **settings)
        return fx, path, cfg

    return _setup


def containers(
    engine: Any, fx: Fixture, *, running_only: bool = False, stage: str = "classify"
) -> list[Any]:
    """This test's containers of a stage (found by the driver's labels)."""
    filters = {"label": [f"{LABEL}={stage}", f"synthflux.data_root={fx.root.resolve()}"]}
    return engine.containers.list(all=not running_only, filters=filters)


def wait_for_container(
    engine: Any, fx: Fixture, alive: Callable[[], bool], stage: str = "classify"
) -> Any:
    deadline = time.monotonic() + 60
    while not (found := containers(engine, fx, running_only=True, stage=stage)):
        assert alive(), "the driver stopped before its container ran"
        assert time.monotonic() < deadline, "no running classify container after 60 s"
        time.sleep(0.05)
    assert len(found) == 1, "one container for all shards"
    return found[0]


class Background:
    """A stage's run(cfg) on a thread, so the test can look at the container while it runs."""

    def __init__(
        self, cfg: PipelineConfig, stage_run: Callable[[PipelineConfig], Any] = classify.run
    ) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, stage_run), daemon=True)
        self.thread.start()

    def _run(self, cfg: PipelineConfig, stage_run: Callable[[PipelineConfig], Any]) -> None:
        try:
            self.result = stage_run(cfg)
        except BaseException as e:
            self.error = e

    def join(self) -> Any:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def run_inside(container: Any, *cmd: str) -> tuple[int, str]:
    code, output = container.exec_run(list(cmd))
    return code, output.decode().strip()


def test_success_over_several_shards(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup()
    assert len(fx.shard_files) == 4
    # What a driver killed with SIGKILL leaves: its container, which the next run removes.
    labels = {LABEL: "classify", "synthflux.data_root": str(fx.root.resolve())}
    leftover = engine.containers.create(cfg.cnn.image, ["--help"], labels=labels)
    summary = classify.run(cfg)
    check_success(fx, summary)
    assert summary.backend == "docker" and summary.image == cfg.cnn.image
    out = fx.root / "predictions" / "synthetic"
    for file in fx.shard_files:  # written by the container user, handed back to the folder's owner
        assert (out / file.replace(".npz", ".probs.npz")).stat().st_uid == out.stat().st_uid
    assert containers(engine, fx) == []
    with pytest.raises(docker.errors.NotFound):
        leftover.reload()


def test_container_isolation_from_its_own_attributes(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup()
    control_standin(fx, hold=True)  # the stand-in waits for us, so we can inspect it running
    run = Background(cfg)
    try:
        container = wait_for_container(engine, fx, run.thread.is_alive)
        attrs = container.attrs
        host = attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert not host["Privileged"] and not host["AutoRemove"]
        assert host["ReadonlyRootfs"] and host["Tmpfs"] == {"/tmp": ""}
        assert host["Memory"] == 512 * 2**20 and host["MemorySwap"] == 512 * 2**20
        assert host["NanoCpus"] == 10**9
        user = attrs["Config"]["User"]
        assert user and int(user.split(":")[0]) != 0
        if os.getuid() == 0:
            assert user == "65534:65534"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        shards, out = "/data/preprocessed/synthetic", "/data/predictions/synthetic"
        assert set(mounts) == {shards, "/data/model/weights.npz", out}
        assert mounts[shards]["RW"] is False
        assert mounts["/data/model/weights.npz"]["RW"] is False
        assert mounts[out]["RW"] is True
        assert Path(mounts[shards]["Source"]) == (fx.root / "preprocessed" / "synthetic").resolve()
        # And from inside: what the classifier process really is and can do.
        assert run_inside(container, "id", "-u") == (0, user.split(":")[0])
        status = dict(
            line.split(":\t", 1)
            for line in run_inside(container, "cat", "/proc/1/status")[1].splitlines()
        )
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        interfaces = run_inside(container, "ls", "/sys/class/net")[1].split()
        assert interfaces == ["lo"]
        code, output = run_inside(container, "touch", "/data/preprocessed/synthetic/intruder")
        assert code != 0 and "Read-only file system" in output
        assert run_inside(container, "touch", "/data/predictions/synthetic/scratch")[0] == 0
        code, output = run_inside(container, "touch", "/opt/intruder")
        assert code != 0 and "Read-only file system" in output
        assert run_inside(container, "touch", "/tmp/scratch")[0] == 0
    finally:
        release_standin(fx)
    check_success(fx, run.join())  # the scratch file went with the staging folder
    assert containers(engine, fx) == []


def test_nonzero_exit_carries_code_and_last_lines(setup: Setup, engine: Any, caplog) -> None:
    fx, _, cfg = setup()
    control_standin(fx, fail="shard-00001.npz")
    with caplog.at_level("INFO", logger="synthflux"), pytest.raises(ClassifierFailed) as err:
        classify.run(cfg)
    e = err.value
    assert e.exit_code == 3 and not e.timed_out
    first = str(e).splitlines()[0]
    assert first.startswith("the classifier container exited with code 3: flux_model: error: ")
    # Docker keeps the order within stdout and within stderr, not between them.
    assert set(e.log_tail[-3:]) == {
        "flux_model: shard-00000.npz: 3 images -> shard-00000.probs.npz",
        "flux_model: reading shard-00001.npz",
        "flux_model: error: shard-00001.npz: simulated failure (contract stand-in)",
    }
    assert (
        "julia | flux_model: shard-00000.npz: 3 images -> shard-00000.probs.npz" in caplog.messages
    )
    assert containers(engine, fx) == []
    assert not (fx.root / "predictions" / "stage.json").exists()


def test_timeout_kills_and_removes_the_container(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup(timeout_s=2)
    control_standin(fx, hang=True)
    start = time.monotonic()
    with pytest.raises(ClassifierFailed, match=r"timed out after 2s .* was killed") as err:
        classify.run(cfg)
    assert time.monotonic() - start < 30
    assert err.value.timed_out and err.value.exit_code == 137
    assert "flux_model: hanging as asked" in err.value.log_tail
    assert containers(engine, fx) == []


def test_memory_limit_is_enforced_and_reported(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup(memory="128m")
    control_standin(fx, allocate_mb=400)
    with pytest.raises(ClassifierFailed, match=r"out of memory: cnn.memory = 128m") as err:
        classify.run(cfg)
    assert err.value.exit_code == 137
    assert containers(engine, fx) == []


@pytest.mark.parametrize(
    ("ctl", "message"),
    [
        ({"malformed": "shard-00002.npz", "kind": "nan"}, r"shard-00002\.npz.*NaN"),
        ({"malformed": "shard-00002.npz", "kind": "garbage"}, r"shard-00002\.npz.*not a readable"),
        ({"skip": "shard-00003.npz"}, r"shard-00003\.npz.*missing"),
    ],
)
def test_bad_or_missing_output_names_the_shard(
    setup: Setup, engine: Any, ctl: dict[str, str], message: str
) -> None:
    fx, _, cfg = setup()
    control_standin(fx, **ctl)
    with pytest.raises(ClassifyError, match=message):
        classify.run(cfg)
    assert containers(engine, fx) == []
    out = fx.root / "predictions"
    assert not (out / "summary.json").exists() and not (out / "stage.json").exists()
    assert not [p.name for p in out.iterdir()], "nothing published, no staging left"


def test_daemon_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Needs no engine: it is about not having one.
    sock = tmp_path / "no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    fx = make_data(tmp_path / "data")
    _, cfg = write_config(tmp_path, fx.root, fx.classes, backend="docker")
    with pytest.raises(ClassifyError) as err:
        classify.run(cfg)
    message = str(err.value)
    assert f"cannot reach the Docker daemon at unix://{sock}" in message
    assert "start Docker" in message and "DOCKER_HOST" in message


def test_image_missing(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup(image="synthflux-test-julia:no-such-tag")
    with pytest.raises(
        ClassifyError, match=r"'synthflux-test-julia:no-such-tag' not found: run `make images`"
    ):
        classify.run(cfg)
    assert containers(engine, fx) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_removes_the_container(setup: Setup, engine: Any, signum: int) -> None:
    fx, path, _ = setup()
    control_standin(fx, hold=True)
    cli = subprocess.Popen(
        [sys.executable, "-m", "synthflux", "classify", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        wait_for_container(engine, fx, lambda: cli.poll() is None)
        cli.send_signal(signum)
        _, stderr = cli.communicate(timeout=60)
    finally:
        release_standin(fx)
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stderr
    assert containers(engine, fx) == []
    assert not [p.name for p in (fx.root / "predictions").iterdir()]


def test_named_volume_mode(tmp_path: Path, engine: Any, image: str) -> None:
    """The driver inside compose: the data root is where the named volume is mounted."""
    volume = engine.volumes.create(f"synthflux-test-{uuid.uuid4().hex[:8]}")
    try:
        root = Path(volume.attrs["Mountpoint"])
        if not os.access(root, os.W_OK):
            unavailable(f"cannot write the volume's folder {root} (needs root)")
        fx = make_data(root)
        _, cfg = write_config(tmp_path, root, fx.classes, image=image, volume=volume.name)
        control_standin(fx, hold=True)
        run = Background(cfg)
        try:
            container = wait_for_container(engine, fx, run.thread.is_alive)
            mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
            assert set(mounts) == {"/data", "/out"}
            data, out = mounts["/data"], mounts["/out"]
            assert (data["Type"], data["Name"], data["RW"]) == ("volume", volume.name, False)
            assert out["Type"] == "volume" and out["RW"] and out["Name"] != volume.name
            scratch = out["Name"]  # anonymous: it must go with the container
            code, output = run_inside(container, "touch", "/data/preprocessed/synthetic/intruder")
            assert code != 0 and "Read-only file system" in output
        finally:
            release_standin(fx)
        check_success(fx, run.join())
        assert containers(engine, fx) == []
        with pytest.raises(docker.errors.NotFound):
            engine.volumes.get(scratch)
    finally:
        volume.remove(force=True)


@pytest.mark.skipif(os.getuid() != 0, reason="only root runs the container as another user")
def test_unreadable_input_fails_before_any_container(setup: Setup, engine: Any) -> None:
    fx, _, cfg = setup()
    shard = fx.root / "preprocessed" / "synthetic" / "shard-00001.npz"
    shard.chmod(0o600)  # the container runs as nobody: it could not read this
    with pytest.raises(ClassifyError, match=r"shard-00001\.npz \(mode 0o600\) is not readable .*"
                       r"65534:65534: run `chmod -R a\+rX .*preprocessed/synthetic`"):  # fmt: skip
        classify.run(cfg)
    assert containers(engine, fx) == []


# --- training through the same driver -----------------------------------------------------------


def test_training_runs_sealed_off_and_publishes_the_weights(setup: Setup, engine: Any) -> None:
    """`flux_model.jl train` in a container: inputs and initial weights read-only, only the
    run folder writable, metrics streamed, the weights published; a re-run resumes."""
    from synthflux import train

    fx, _, cfg = setup()
    control_standin(fx, hold=True)
    run = Background(cfg, train.run)
    try:
        container = wait_for_container(engine, fx, run.thread.is_alive, stage="train")
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert set(mounts) == {"/data/preprocessed/synthetic", "/data/training/init-weights.npz",
                               "/data/training/run"}  # fmt: skip
        assert not mounts["/data/preprocessed/synthetic"]["RW"]
        assert not mounts["/data/training/init-weights.npz"]["RW"]
        assert mounts["/data/training/run"]["RW"]
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        command = container.attrs["Config"]["Cmd"]
        assert command[:3] == ["train", "--input", "synthetic=/data/preprocessed/synthetic"]
        assert "--epochs" in command
    finally:
        release_standin(fx)
    summary = run.join()
    assert summary.complete and len(summary.epochs) == cfg.train.epochs
    assert (fx.root / "model" / "weights.npz").is_file()
    assert lineage.is_current(cfg, "train") and containers(engine, fx, stage="train") == []


def test_a_failed_training_keeps_its_checkpoint_for_the_next_run(setup: Setup, engine: Any) -> None:
    from synthflux import train

    fx, _, cfg = setup()
    control_standin(fx, fail_epoch=2)
    with pytest.raises(TrainerFailed, match="trainer container exited with code 3") as err:
        train.run(cfg)
    assert "simulated failure in epoch 2" in str(err.value)
    control_standin(fx)
    summary = train.run(cfg)
    assert summary.complete
    ck = fx.root / "training" / "run" / "checkpoint.npz"
    assert ck.is_file() and containers(engine, fx, stage="train") == []
