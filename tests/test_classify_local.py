"""classify with backend "local": the driver runs `julia ... flux_model.jl` as a subprocess.

A contract test of the driver: `cnn.julia` points at a wrapper that runs
tests/standin/flux_model_standin.py (Python + NumPy implementing flux_model.jl's command line
and files), not at Julia. The Julia side is tested in tests/test_julia.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from classify_data import (
    Fixture,
    check_success,
    control_standin,
    fake_julia,
    make_data,
    release_standin,
    write_config,
)

from synthflux import classify, lineage
from synthflux.config import PipelineConfig
from synthflux.errors import ClassifierFailed, ClassifyError, DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """setup(**settings) -> (fixture data, config path, config) for the local backend."""
    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    monkeypatch.delenv("SYNTHFLUX_STANDIN", raising=False)
    fx = make_data(tmp_path / "data")

    def _setup(**more) -> tuple[Fixture, Path, PipelineConfig]:
        settings = {"backend": "local", "julia": str(exe), **more}
        path, cfg = write_config(tmp_path, fx.root, fx.classes, **settings)
        return fx, path, cfg

    return _setup


def standin_processes(data_root: Path) -> list[psutil.Process]:
    """Stand-in processes still running over this data root."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("flux_model_standin" in a for a in cmdline) and any(
            str(data_root) in a for a in cmdline
        ):
            found.append(proc)
    return found


def test_success_over_several_shards(setup) -> None:
    fx, _, cfg = setup()
    assert len(fx.shard_files) == 4  # 10 images in shards of 3: the last one is short
    summary = classify.run(cfg)
    check_success(fx, summary)
    assert summary.backend == "local" and summary.image is None
    # The default weights were created from the seed, readable like any data file.
    weights = fx.root / "model" / "weights.npz"
    assert weights.is_file() and weights.stat().st_mode & 0o044 == 0o044


def test_reruns_replace_previous_outputs(setup) -> None:
    fx, _, cfg = setup()
    classify.run(cfg)
    first = (fx.root / "predictions" / "predictions.csv").read_bytes()
    summary = classify.run(cfg)
    check_success(fx, summary)
    assert (fx.root / "predictions" / "predictions.csv").read_bytes() == first


def test_nonzero_exit_carries_code_and_last_lines(setup, caplog) -> None:
    fx, _, cfg = setup()
    control_standin(fx, fail="shard-00002.npz")
    with caplog.at_level("INFO", logger="synthflux"), pytest.raises(ClassifierFailed) as err:
        classify.run(cfg)
    e = err.value
    assert e.exit_code == 3 and not e.timed_out
    assert "flux_model: error: shard-00002.npz: simulated failure" in str(e).splitlines()[0]
    # The tail is the classifier's own output, in order, ending with its error line.
    assert e.log_tail[-2:] == [
        "flux_model: reading shard-00002.npz",
        "flux_model: error: shard-00002.npz: simulated failure (contract stand-in)",
    ]
    assert any("shard-00000.npz: 3 images" in line for line in e.log_tail)
    # Lines were streamed to the user as they came, prefixed.
    assert "julia | flux_model: reading shard-00002.npz" in caplog.messages
    assert not (fx.root / "predictions" / "stage.json").exists()


def test_timeout_kills_the_classifier(setup) -> None:
    fx, _, cfg = setup(timeout_s=1)
    control_standin(fx, hang=True)
    start = time.monotonic()
    with pytest.raises(ClassifierFailed, match=r"timed out after 1s") as err:
        classify.run(cfg)
    assert time.monotonic() - start < 15
    assert err.value.timed_out
    assert "flux_model: hanging as asked" in err.value.log_tail
    assert standin_processes(fx.root) == []


@pytest.mark.parametrize("kind", ["shape", "nan", "sum", "ids", "garbage"])
def test_malformed_output_names_the_shard(setup, kind: str) -> None:
    fx, _, cfg = setup()
    control_standin(fx, malformed="shard-00001.npz", kind=kind)
    expected = {
        "shape": r"probs must be float32 \(3, 2\), got float32 \(3, 1\)",
        "nan": "NaN",
        "sum": "must sum to 1",
        "ids": "ids differ",
        "garbage": "not a readable .npz",
    }[kind]
    with pytest.raises(ClassifyError, match=rf"shard-00001\.npz.*{expected}"):
        classify.run(cfg)
    out = fx.root / "predictions"
    assert not (out / "stage.json").exists() and not (out / "summary.json").exists()


def test_missing_output_names_the_shard_even_with_an_old_one_present(setup) -> None:
    fx, _, cfg = setup()
    classify.run(cfg)  # leaves a good shard-00003.probs.npz from this first run
    before = {p.name: p.read_bytes() for p in (fx.root / "predictions").iterdir() if p.is_file()}
    control_standin(fx, skip="shard-00003.npz")
    with pytest.raises(ClassifyError, match=r"shard-00003\.npz.*missing"):
        classify.run(cfg)
    # The failed attempt published nothing: the first run's results are intact and current.
    after = {p.name: p.read_bytes() for p in (fx.root / "predictions").iterdir() if p.is_file()}
    assert after == before and lineage.is_current(cfg, "classify")


def test_missing_julia_and_missing_project(setup, monkeypatch, tmp_path) -> None:
    _, _, cfg = setup(julia=str(tmp_path / "no-such-julia"))
    with pytest.raises(ClassifyError, match="is not an executable on PATH"):
        classify.run(cfg)
    _, _, cfg = setup()
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ClassifyError, match="no flux_model.jl in .*SYNTHFLUX_JULIA_DIR"):
        classify.run(cfg)


def test_weights_checks(setup, tmp_path) -> None:
    from synthflux.weights import init_weights, save_weights

    _, _, cfg = setup(weights=str(tmp_path / "missing.npz"))
    with pytest.raises(ClassifyError, match="missing.npz'?: no such file"):
        classify.run(cfg)
    wrong = tmp_path / "wrong.npz"
    save_weights(wrong, init_weights(16, 16, 1, 2, seed=0))
    _, _, cfg = setup(weights=str(wrong))
    with pytest.raises(ClassifyError, match="for 16x16x1 images and 2 classes.*8x8x1"):
        classify.run(cfg)


def test_missing_inputs_say_which_stage_to_run(setup) -> None:
    fx, _, cfg = setup()
    (fx.root / "preprocessed" / "synthetic" / "dataset.json").unlink()
    with pytest.raises(DataError, match="run `synthflux preprocess` first"):
        classify.run(cfg)


def test_cli_prints_summary_and_one_line_errors(setup) -> None:
    fx, path, _ = setup()
    env = {**os.environ}
    done = subprocess.run(
        [sys.executable, "-m", "synthflux", "classify", str(path)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((fx.root / "predictions" / "summary.json").read_text())
    assert f"({summary['correct']}/10)" in done.stdout
    assert "julia | flux_model: done: 10 images in 4 shards" in done.stderr

    control_standin(fx, fail="shard-00000.npz")
    done = subprocess.run(
        [sys.executable, "-m", "synthflux", "classify", str(path), "--backend", "local"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        "synthflux classify: error: julia exited with code 3: flux_model: error: "
        "shard-00000.npz: simulated failure (contract stand-in); last 3 log lines:"
    ) in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_the_classifier(setup, signum: int) -> None:
    fx, path, _ = setup()
    control_standin(fx, hold=True)
    cli = subprocess.Popen(
        [sys.executable, "-m", "synthflux", "classify", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not standin_processes(fx.root):
            assert time.monotonic() < deadline and cli.poll() is None, "stand-in never started"
            time.sleep(0.05)
        cli.send_signal(signum)
        _, stderr = cli.communicate(timeout=30)
    finally:
        release_standin(fx)  # whatever happened, let no stand-in wait out its 120 s
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr
    assert standin_processes(fx.root) == []
    assert not (fx.root / "predictions" / "stage.json").exists()
    assert not [p for p in (fx.root / "predictions").iterdir() if p.name.startswith(".")]


def test_three_classes(tmp_path, monkeypatch) -> None:
    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    fx = make_data(tmp_path / "data", classes=("cat", "dog", "fox"), per_class=4, shard_size=5)
    _, cfg = write_config(tmp_path, fx.root, fx.classes, backend="local", julia=str(exe))
    summary = classify.run(cfg)
    check_success(fx, summary)
    assert np.array(summary.confusion).shape == (3, 3)
