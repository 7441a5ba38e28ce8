"""The Julia side for real: julia/test/runtests.jl and end-to-end julia/flux_model.jl runs.

They need a Julia that loads Flux and NPZ with `--project=julia`: $SYNTHFLUX_JULIA, or `julia`
on PATH. CI has none, so they skip there with the reason; tests/test_reference.py keeps the
golden files, and so the Julia side's expected numbers, checked without Julia.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from synthflux import reference
from synthflux.layout import probs_file
from synthflux.weights import load_weights, spec_of

REPO = Path(__file__).resolve().parents[1]
JULIA_PROJECT = REPO / "julia"
FLUX_MODEL = JULIA_PROJECT / "flux_model.jl"
GOLDEN = REPO / "tests" / "fixtures" / "golden"
# Loading Flux takes ~20 s on Julia 1.5; a first run may precompile for minutes.
TIMEOUT_S = 1200

pytestmark = pytest.mark.julia


@functools.cache
def find_julia() -> tuple[str | None, str]:
    """(executable, "") if it loads Flux and NPZ with --project=julia, else (None, why not)."""
    name = os.environ.get("SYNTHFLUX_JULIA", "julia")
    exe = shutil.which(name)
    if exe is None:
        return (
            None,
            f"no Julia: {name!r} is not on PATH (set SYNTHFLUX_JULIA to one with Flux/NPZ)",
        )
    probe = [exe, f"--project={JULIA_PROJECT}", "-e", "using Flux, NPZ"]
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"{exe} did not load Flux and NPZ within {TIMEOUT_S} s"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"{exe} cannot load Flux and NPZ with --project=julia: {last}"
    return exe, ""


@pytest.fixture(scope="module")
def julia() -> str:
    exe, reason = find_julia()
    if exe is None:
        pytest.skip(reason)
    return exe


def run_flux_model(julia: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [julia, f"--project={JULIA_PROJECT}", str(FLUX_MODEL), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_julia_runtests(julia: str) -> None:
    cmd = [
        julia,
        f"--project={JULIA_PROJECT}",
        str(JULIA_PROJECT / "test" / "runtests.jl"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Test Summary" in r.stdout


@pytest.mark.parametrize("case", ["gray", "large"])  # runtests.jl checks every case in-process
def test_flux_model_matches_golden(julia: str, tmp_path: Path, case: str) -> None:
    shards = sorted((GOLDEN / case).glob("shard-*.npz"))
    out = tmp_path / "pred"
    r = run_flux_model(
        julia, "--input", GOLDEN / case, "--weights", GOLDEN / case / "weights.npz",
        "--output", out, "--batch-size", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    shard_lines = [line for line in lines if line.startswith("shard-")]
    assert [line.split(":")[0] for line in shard_lines] == [s.name for s in shards]
    assert any(line.startswith("summary:") for line in lines)
    for shard in shards:
        name = probs_file(shard.name)
        got, expected = (
            load_npz(out / name),
            load_npz(GOLDEN / case / "expected" / name),
        )
        assert got["probs"].dtype == np.float32 and got["ids"].dtype == np.int64
        assert got["probs"].shape == expected["probs"].shape
        atol = expected["atol"][0]  # from the float64 truth, within the case's float32 tolerance
        np.testing.assert_allclose(got["probs"], expected["probs"], atol=atol, rtol=0)
        np.testing.assert_allclose(got["probs"].sum(axis=1), 1, atol=1e-5)
        np.testing.assert_array_equal(got["ids"], expected["ids"])


def test_flux_model_corrupt_shard_exits_1_and_keeps_outputs(julia: str, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "pred"
    inputs.mkdir()
    out.mkdir()
    shutil.copy(GOLDEN / "gray" / "shard-00000.npz", inputs / "shard-00000.npz")
    corrupt = inputs / "shard-00001.npz"
    corrupt.write_bytes((GOLDEN / "gray" / "shard-00001.npz").read_bytes()[:500])
    stale = out / "shard-00001.probs.npz"
    stale.write_bytes(b"earlier output")
    r = run_flux_model(
        julia,
        "--input",
        inputs,
        "--weights",
        GOLDEN / "gray" / "weights.npz",
        "--output",
        out,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"flux_model: error: {corrupt}: ")
    good = load_npz(out / "shard-00000.probs.npz")  # finished before the bad shard
    expected = load_npz(GOLDEN / "gray" / "expected" / "shard-00000.probs.npz")
    np.testing.assert_allclose(good["probs"], expected["probs"], atol=expected["atol"][0], rtol=0)
    assert stale.read_bytes() == b"earlier output"
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.probs.npz",
        stale.name,
    ]


def test_weights_initialised_by_julia_run_the_same_in_torch(julia: str, tmp_path: Path) -> None:
    """Julia writes weights.npz when it is missing; numpy reads it, torch reproduces the probs.

    The input is an empty shard plus a real one, as preprocess writes them (zip64 entries).
    """
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = np.asfortranarray(rng.standard_normal((20, 16, 3, 9)), dtype=np.float32)
    ids = np.arange(100, 109, dtype=np.int64)
    np.savez(inputs / "shard-00000.npz", images=images, labels=ids % 2, ids=ids)
    empty = np.zeros((20, 16, 3, 0), dtype=np.float32, order="F")
    none = np.zeros(0, np.int64)
    np.savez(inputs / "shard-00001.npz", images=empty, labels=none, ids=none)
    weights_file, out = tmp_path / "model" / "weights.npz", tmp_path / "pred"

    r = run_flux_model(
        julia,
        "--input",
        inputs,
        "--weights",
        weights_file,
        "--output",
        out,
        "--seed",
        "3",
    )
    assert r.returncode == 0, r.stderr
    assert "initialised from seed 3" in r.stdout
    weights = load_weights(weights_file)  # checks names, dtypes, shapes
    spec = spec_of(weights)
    assert (spec.width, spec.height, spec.channels, spec.n_classes) == (20, 16, 3, 2)
    got = load_npz(out / "shard-00000.probs.npz")
    np.testing.assert_allclose(got["probs"], reference.predict(weights, images), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["ids"], ids)
    got_empty = load_npz(out / "shard-00001.probs.npz")
    assert got_empty["probs"].shape == (0, 2) and got_empty["ids"].shape == (0,)


def test_a_julia_checkpoint_goes_on_in_the_twin_and_the_files_agree(
    julia: str, tmp_path: Path
) -> None:
    """Julia trains the golden case for 2 epochs; the PyTorch twin resumes its checkpoint to 3
    and lands where the twin's own 3 epochs do (the files mean the same in both languages);
    both write metrics.jsonl in one format."""
    from synthflux import reference_train

    train = GOLDEN / "train"
    common = [
        "--input",
        f"golden={train / 'data'}",
        "--weights",
        str(train / "init.npz"),
    ]
    args = [*(train / "args.txt").read_text().split(), "--epochs"]
    r = run_flux_model(julia, "train", *common, "--output", tmp_path / "j", *args, "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("done: stopped after 2 epochs; best epoch ")
    julia_lines = (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()
    printed = [x.removeprefix("metrics: ") for x in r.stdout.splitlines() if "metrics: " in x]
    assert julia_lines == printed

    def twin(out: Path) -> None:
        reference_train.main([*common, "--output", str(out), *args, "3"], lambda _: True)

    twin(tmp_path / "j")
    twin(tmp_path / "py")
    got, want = (
        load_npz(tmp_path / "j" / "checkpoint.npz"),
        load_npz(tmp_path / "py" / "checkpoint.npz"),
    )
    np.testing.assert_array_equal(got["state"], want["state"])
    for name in load_weights(train / "init.npz"):
        if name != "arch":
            assert np.abs(got[name] - want[name]).max() <= 1e-4 * np.abs(want[name]).max(), name
    resumed = (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()
    assert resumed[:2] == julia_lines  # the twin keeps Julia's history as Julia wrote it
    python_lines = (tmp_path / "py" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(resumed, python_lines, strict=True):
        ja, jb = json.loads(a), json.loads(b)
        assert list(ja) == list(jb)
        assert {k: ja[k] for k in ("epoch", "steps", "best_epoch", "train_accuracy")} == {
            k: jb[k] for k in ("epoch", "steps", "best_epoch", "train_accuracy")
        }
        assert ja["train_loss"] == pytest.approx(jb["train_loss"], rel=1e-4)


def test_one_julia_server_runs_every_job_and_survives_a_failed_one(
    julia: str, tmp_path: Path
) -> None:
    """`flux_model.jl serve` through the driver's session: each golden case in one process,
    a failing job between them, the same probabilities as the one-shot runs."""
    from synthflux.backends.job import Job
    from synthflux.backends.serve import JuliaServer
    from synthflux.errors import ClassifierFailed

    server = JuliaServer(julia, JULIA_PROJECT)

    def job(case: str, out: Path) -> tuple[Job, list[str]]:
        out.mkdir()
        weights = GOLDEN / case / "weights.npz"
        j = Job("classify", ((case, GOLDEN / case),), (), weights, out, "x", timeout_s=TIMEOUT_S)
        return j, ["--input", str(GOLDEN / case), "--weights", str(weights), "--output", str(out)]

    try:
        cases = sorted(c.name for c in GOLDEN.iterdir() if (c / "weights.npz").is_file())[:2]
        server.run(*job(cases[0], tmp_path / "a"))
        bad, args = job(cases[0], tmp_path / "bad")
        with pytest.raises(
            ClassifierFailed, match=r"julia exited with code 1: flux_model: error: "
        ):
            server.run(bad, [*args[:1], str(tmp_path / "missing"), *args[2:]])
        server.run(*job(cases[1], tmp_path / "b"))
        assert server.starts == 1 and server.jobs == 3
    finally:
        server.close()
    assert server.proc is None
    for case, out in zip(cases, (tmp_path / "a", tmp_path / "b"), strict=True):
        for expected in sorted((GOLDEN / case / "expected").glob("*.probs.npz")):
            got, want = load_npz(out / expected.name), load_npz(expected)
            np.testing.assert_allclose(got["probs"], want["probs"], atol=want["atol"][0], rtol=0)
