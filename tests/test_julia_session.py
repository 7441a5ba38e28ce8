"""One julia per run: `synthflux run` sends every train and classify job of backend "local"
to one `flux_model.jl serve` process (synthflux.backends.serve).

Against the contract stand-in (tests/standin), through a fake `julia` that logs each start;
the real server is tested in julia/test/runtests.jl and tests/test_julia.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import test_classify_local
from classify_data import (
    check_success,
    control_standin,
    fake_julia,
    julia_starts,
    make_data,
    write_config,
)
from test_train import quiet, real_folder

from synthflux import classify, ingest
from synthflux.backends.job import Job
from synthflux.backends.serve import job_line, session
from synthflux.errors import ClassifierFailed, ClassifyError
from synthflux.pipeline import run_pipeline

setup = test_classify_local.setup  # the same fixture: the stand-in behind a fake julia


def servers(folder: Path) -> list[psutil.Process]:
    """Stand-in servers started from `folder`'s fake julia that are still running."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "serve" in cmdline and any(str(folder) in a for a in cmdline):
            found.append(proc)
    return found


def test_a_run_starts_julia_once_for_training_and_every_source(write_config, tmp_path, monkeypatch):
    """Train plus one classify job per source (synthetic, and a real test set): one start."""
    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    _, cfg = write_config(cnn={"backend": "local", "julia": str(exe)}, train={"epochs": 2})
    ingest.run(cfg, real_folder(tmp_path / "photos"), split="test", name="photos")
    summaries = run_pipeline(cfg, say=quiet)
    names = [type(s).__name__ for s in summaries]
    assert names[-4:] == ["TrainSummary", "ClassifySummary", "EvaluateSummary", "ReportSummary"]
    starts = julia_starts(tmp_path)
    assert len(starts) == 1, starts
    assert starts[0].endswith("flux_model.jl serve")
    result = json.loads((cfg.data_root / "evaluation" / "summary.json").read_text())
    assert result["splits"]["photos"]["images"] == 12  # both sources were classified
    assert (cfg.data_root / "model" / "weights.npz").is_file()
    assert servers(tmp_path) == []  # the session closed its server


def test_without_a_session_each_job_starts_its_own_julia(tmp_path, monkeypatch) -> None:
    """`synthflux classify` alone: one-shot julia as before (no server left behind)."""
    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    fx = make_data(tmp_path / "data")
    _, cfg = write_config(tmp_path, fx.root, fx.classes, backend="local", julia=str(exe))
    check_success(fx, classify.run(cfg))
    classify.run(cfg)
    starts = julia_starts(tmp_path)
    assert len(starts) == 2 and not any(s.endswith(" serve") for s in starts)


def test_a_failed_job_leaves_the_server_working(setup, tmp_path) -> None:
    fx, _, cfg = setup()
    with session():
        control_standin(fx, fail="shard-00002.npz")
        with pytest.raises(ClassifierFailed) as err:
            classify.run(cfg)
        e = err.value
        assert e.exit_code == 3 and not e.timed_out
        assert "julia exited with code 3: flux_model: error: shard-00002.npz: simulated" in str(e)
        assert e.log_tail[-1].startswith("flux_model: error: shard-00002.npz")
        (fx.root / "preprocessed" / "synthetic" / "standin-control.json").unlink()
        check_success(fx, classify.run(cfg))
        assert len(servers(tmp_path)) == 1
    assert len(julia_starts(tmp_path)) == 1
    assert servers(tmp_path) == []


def test_a_crashed_server_is_reported_and_the_next_job_starts_a_new_one(setup, tmp_path) -> None:
    fx, _, cfg = setup()
    with session():
        control_standin(fx, crash=True)
        with pytest.raises(ClassifierFailed, match=r"julia exited with code 9 during the job \(the "
                           r"julia server crashed; the next job starts a new one\)") as err:  # fmt: skip
            classify.run(cfg)
        assert err.value.exit_code == 9
        assert "flux_model: the server crashes as asked" in err.value.log_tail
        (fx.root / "preprocessed" / "synthetic" / "standin-control.json").unlink()
        check_success(fx, classify.run(cfg))
    assert len(julia_starts(tmp_path)) == 2


def test_a_timeout_kills_the_server_and_the_next_job_starts_a_new_one(setup, tmp_path) -> None:
    fx, _, cfg = setup(timeout_s=1)
    with session():
        control_standin(fx, hang=True)
        start = time.monotonic()
        with pytest.raises(ClassifierFailed, match=r"timed out after 1s \(cnn.timeout_s\)") as err:
            classify.run(cfg)
        assert time.monotonic() - start < 15 and err.value.timed_out
        assert "flux_model: hanging as asked" in err.value.log_tail
        assert servers(tmp_path) == []  # killed, not left hanging
        (fx.root / "preprocessed" / "synthetic" / "standin-control.json").unlink()
        check_success(fx, classify.run(cfg))
    assert len(julia_starts(tmp_path)) == 2


def test_a_tab_or_line_break_in_a_path_is_a_clear_error(tmp_path) -> None:
    job = Job("classify", (), (), tmp_path / "w.npz", tmp_path / "out", "out")
    assert job_line(job, ["--input", "a b", "--output", "c"]) == "--input\ta b\t--output\tc\n"
    with pytest.raises(ClassifyError, match=r"'a\\tb': a tab or line break in a path"):
        job_line(job, ["--input", "a\tb"])
