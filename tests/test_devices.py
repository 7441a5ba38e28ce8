"""[generate] devices / --devices: one worker per local device, each with its part of the
batches. Tested with several CPU "devices" (workers that share the cores): the bytes equal
one process's, the progress counts add up, a killed worker resumes, bad devices are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, run_cli, tree_bytes
from synthflux import generate, lineage
from synthflux.config import load_config

THREE = ["cpu", "cpu", "cpu"]


def generated(cfg) -> dict[str, bytes]:
    return tree_bytes(cfg.layout.generated, "*/*.png") | {
        "manifest.jsonl": cfg.layout.manifest.read_bytes()
    }


def test_workers_make_the_bytes_one_process_makes(write_config, tmp_path):
    _, one = write_config(data=tmp_path / "one", images_per_class=5)
    path, three = write_config(data=tmp_path / "three", name="t.toml", images_per_class=5,
                               generate={"devices": THREE})  # fmt: skip
    generate.run(one)
    done = run_cli("generate", str(path))
    assert done.returncode == 0, done.stderr
    assert "10 images planned, 0 already done, 10 generated" in done.stdout
    # one bar for the whole: the workers' counts add up to every image
    counts = [line for line in done.stderr.splitlines() if line.startswith("synthflux: generate: ")]
    assert counts and counts[-1].startswith("synthflux: generate: 10/10 img"), done.stderr
    assert generated(three) == generated(one)
    assert lineage.is_current(three, "generate")
    again = generate.run(three)  # a re-run makes nothing
    assert again.generated == 0 and again.reused == 10 and again.manifest_complete
    # --devices on the command line, in another data root: the same bytes again
    cli = run_cli("generate", str(path), "--data", str(tmp_path / "cli"), "--devices", "cpu,cpu")
    assert cli.returncode == 0, cli.stderr
    assert generated(load_config(path, tmp_path / "cli")) == generated(one)


def test_a_killed_worker_is_one_line_and_a_rerun_makes_what_is_missing(write_config, tmp_path):
    _, one = write_config(data=tmp_path / "one", images_per_class=6)
    path, three = write_config(data=tmp_path / "three", name="t.toml", images_per_class=6,
                               generate={"devices": THREE})  # fmt: skip
    generate.run(one)
    parent = subprocess.Popen(
        [sys.executable, "-m", "synthflux", "generate", str(path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SYNTHFLUX_TEST_HOLD": "image:1"},
    )  # fmt: skip
    workers = _stopped_workers(parent.pid, 3)  # each stopped itself after its first image
    victim, others = workers[0], workers[1:]
    victim.kill()
    for w in others:
        w.resume()
    _, err = parent.communicate(timeout=300)
    assert parent.returncode == 2, err
    said = [line for line in err.splitlines() if "error" in line]
    assert len(said) == 1 and "the worker on cpu (shard 0/3) was killed (SIGKILL)" in said[0]
    assert "re-run to make what is missing" in said[0]
    assert not lineage.is_current(three, "generate")
    rerun = generate.run(three)
    assert 0 < rerun.generated < 12 and rerun.manifest_complete
    assert generated(three) == generated(one)


def _stopped_workers(pid: int, n: int, timeout: float = 180) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        children = psutil.Process(pid).children()
        stopped = [c for c in children if c.status() == psutil.STATUS_STOPPED]
        if len(stopped) == n:
            return sorted(stopped, key=lambda c: (c.create_time(), c.pid))
        assert time.monotonic() < deadline, f"{len(stopped)} of {n} workers stopped"
        time.sleep(0.2)


def test_ctrl_c_stops_every_worker_with_one_line(write_config, tmp_path):
    path, _ = write_config(data=tmp_path / "three", images_per_class=6,
                           generate={"devices": THREE})  # fmt: skip
    parent = subprocess.Popen(
        [sys.executable, "-m", "synthflux", "generate", str(path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SYNTHFLUX_TEST_HOLD": "image:1"},
    )  # fmt: skip
    workers = _stopped_workers(parent.pid, 3)
    parent.send_signal(signal.SIGINT)
    time.sleep(0.5)  # (the parent forwards a SIGTERM; stopped workers take it once resumed)
    for w in workers:
        w.resume()
    _, err = parent.communicate(timeout=300)
    assert parent.returncode == 130, err
    assert err.strip().splitlines()[-1] == "synthflux generate: interrupted; re-run to resume"
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ('"all"', "PyTorch sees no CUDA GPU here"),
        ('["cuda:3"]', "'cuda:3' is not visible here"),
        ('["cuda:1", "cuda:1"]', "'cuda:1' is listed twice"),
        ('["gpu0"]', "'gpu0' is not a device"),
    ],
)
def test_bad_devices_are_one_line_before_anything_starts(write_config, tmp_path, devices, message):
    path, cfg = write_config(data=tmp_path / "data")
    text = path.read_text().replace("[generate]", f"[generate]\ndevices = {devices}")
    path.write_text(text)
    for command in ("generate", "run"):
        done = run_cli(command, str(path))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.strip().count("\n") == 0
        assert not Path(cfg.layout.generated).exists()
    flag = run_cli("generate", str(path), "--devices", "cuda:0,cuda")
    assert flag.returncode == 2 and "listed twice" in flag.stderr


def test_the_workers_of_a_parent_killed_outright_stop_themselves(write_config, tmp_path):
    path, cfg = write_config(data=tmp_path / "three", images_per_class=30,
                             generate={"devices": THREE})  # fmt: skip
    parent = subprocess.Popen(
        [sys.executable, "-m", "synthflux", "generate", str(path)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "SYNTHFLUX_TEST_HOLD": "image:1"},
    )  # fmt: skip
    workers = _stopped_workers(parent.pid, 3)
    parent.kill()
    parent.wait()
    for w in workers:
        w.resume()
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.2)
    assert len(list(cfg.layout.generated.glob("*/*.png"))) < 60  # stopped, not run to the end


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def test_run_and_sweep_pass_devices_through(write_config, tmp_path):
    from synthflux import sweep

    path, _ = write_config(data=tmp_path / "data", sweep={"images": [2], "sources": ["synthetic"]})
    for command in ("run", "sweep", "generate"):
        done = run_cli(command, str(path), "--devices", "all")  # this machine has no GPU
        assert done.returncode == 2 and "PyTorch sees no CUDA GPU" in done.stderr, done.stderr
    assert "--devices" in run_cli("finetune", "--help").stdout
    grid = sweep.plan(path, devices=["cpu", "cpu"])
    assert [c.generate.devices for c in grid.images.values()] == [["cpu", "cpu"]]


def test_a_limit_over_the_workers_makes_what_one_process_makes(write_config, tmp_path):
    """--limit K: the batches one process would take, each made by the worker it falls to
    (a worker with none is not started); the counts are one process's."""
    _, one = write_config(data=tmp_path / "one", images_per_class=6)
    _, six = write_config(data=tmp_path / "six", name="s.toml", images_per_class=6,
                          generate={"devices": ["cpu"] * 6})  # fmt: skip
    for limit in (3, 1, 1):  # the second 1: the first workers' batches are done by then
        a, b = generate.run(one, limit=limit), generate.run(six, limit=limit)
        assert (b.generated, b.reused, b.remaining) == (a.generated, a.reused, a.remaining)
        assert generated(six) == generated(one)
    assert b.remaining > 0 and "re-run to continue" in "\n".join(b.lines())
