"""`synthflux submit` and `synthflux status` against a real Slurm cluster.

.ci/start-slurm.sh starts a single-node cluster (slurmctld, slurmd, slurmdbd). With CI set,
a cluster that does not answer fails these tests; elsewhere they are skipped with the reason.
The --dry-run golden files and the option checks need no cluster. Regenerate the golden files
with UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, run_cli, tiny_config, tree_bytes
from synthflux.config import load_config
from synthflux.pipeline import STAGES

GOLDEN = Path(__file__).parent / "fixtures" / "slurm"
SLURM_CONF = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
PYTHON = "/opt/venv/bin/python"  # in golden scripts, instead of this machine's interpreter
WAIT_S = 150
CLASSIFY_BACKEND = "reference"  # the PyTorch twin of the Flux CNN: no Julia on the node
# One image per batch: task i of N then makes images i, i + N, ... in the canonical order.
ONE_PER_BATCH: dict[str, Any] = {"generate": {"batch_size": 1}}


# --- helpers ------------------------------------------------------------------------------------


def slurm_problem() -> str | None:
    """Why the cluster cannot be used, or None if `sinfo` shows a usable node."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (run .ci/start-slurm.sh)"
    if not SLURM_CONF.is_file():  # without it every client spends a minute on DNS
        return f"{SLURM_CONF} not found (run .ci/start-slurm.sh)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    states = proc.stdout.split()
    if proc.returncode or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no usable Slurm node: {(proc.stderr or proc.stdout).strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Slurm tests, but: {problem}")
    pytest.skip(problem)


def cli(*args: str) -> str:
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 0, f"synthflux {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def submission(data: Path) -> dict[str, Any]:
    return json.loads((data / "slurm" / "submission.json").read_text())


def job_ids(data: Path) -> dict[str, str]:
    return {stage: job["id"] for stage, job in submission(data)["jobs"].items()}


def wait_for_jobs(ids: list[str]) -> None:
    """Until none of these jobs (arrays) is pending or running."""
    deadline = time.monotonic() + WAIT_S
    while True:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True
        ).stdout
        if not set(out.split()) & set(ids):
            return
        assert time.monotonic() < deadline, f"jobs {ids} still queued after {WAIT_S}s:\n{out}"
        time.sleep(0.5)


def job_states(ids: list[str]) -> dict[str, str]:
    """Accounting state of every task: {"12_0": "COMPLETED", "13_[0-2]": "CANCELLED", ...}.

    slurmdbd records job ends a moment after the jobs leave the queue: wait for final states.
    """
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        states = dict(line.split("|", 1) for line in out.splitlines() if line)
        states = {k: v.split()[0] for k, v in states.items()}  # "CANCELLED by 0" -> CANCELLED
        if states and not {"PENDING", "RUNNING", "REQUEUED"} & set(states.values()):
            return states
        assert time.monotonic() < deadline, f"sacct never showed final states: {out}"
        time.sleep(0.5)


def stage_states(states: dict[str, str], job: str) -> set[str]:
    return {v for k, v in states.items() if k == job or k.startswith(f"{job}_")}


def status_json(config: Path) -> dict[str, Any]:
    return json.loads(cli("status", str(config), "--json"))


def assert_same_as_unsharded(data: Path, reference: Path) -> None:
    """The sharded run's images, manifest and preprocessed shards equal the unsharded run's."""
    for sub, pattern in (("generated", "**/*.png"), ("generated", "manifest.jsonl"),
                         ("preprocessed", "**/*")):  # fmt: skip
        got, want = tree_bytes(data / sub, pattern), tree_bytes(reference / sub, pattern)
        assert sorted(got) == sorted(want), f"{sub}/{pattern}: different files"
        different = [name for name in want if got[name] != want[name]]
        assert not different, f"{sub}: bytes differ from the unsharded run: {different}"
    # ... and so is the model trained on them (the PyTorch twin is bitwise on a CPU).
    weights = "model/weights.npz"
    assert (data / weights).read_bytes() == (reference / weights).read_bytes()
    summary = json.loads((data / "predictions" / "summary.json").read_text())
    assert (summary["images"], summary["backend"]) == (8, CLASSIFY_BACKEND)


def normalise(text: str, tmp: Path) -> str:
    """Machine-specific paths -> placeholders; submissions run in the repository (run_cli)."""
    return text.replace(str(tmp), "<tmp>").replace(str(REPO), "<repo>")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"no golden file {path}: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1)"


# --- no cluster needed --------------------------------------------------------------------------


def dry_run(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    from synthflux.cli import main

    config, _ = tiny_config(tmp_path, tmp_path / "data", tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # as run_cli: --chdir is the folder `submit` ran in
        assert main(["submit", str(config), "--dry-run", "--python", PYTHON, *args]) == 0
    return normalise(capsys.readouterr().out, tmp_path)


def test_dry_run_matches_golden(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = dry_run(
        tmp_path, tiny_model, capsys, "--shards", "3", "--partition", "gpu", "--gpus-per-task", "1",
        "--cpus-per-task", "4", "--time", "2:00:00", "--max-parallel", "2",
        "--classify-backend", "local", "--sbatch-option=--account=lab",
    )  # fmt: skip
    check_golden("submit-3-shards.txt", text)
    assert not (tmp_path / "data").exists(), "--dry-run must write nothing"


def test_dry_run_apptainer_matches_golden(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = dry_run(
        tmp_path, tiny_model, capsys, "--shards", "2", "--classify-backend", "apptainer",
        "--sif", "/images/synthflux-julia.sif",
    )  # fmt: skip
    check_golden("submit-apptainer.txt", text)


def test_python_may_be_a_command_line(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from synthflux.cli import main

    config, cfg = tiny_config(tmp_path, tmp_path / "data", tiny_model)
    python = "apptainer exec --nv '/images/synthflux python.sif' python"
    assert main(["submit", str(config), "--shards", "2", "--dry-run", "--python", python]) == 0
    execs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("exec ")]
    needed = [st for st in STAGES if st.applies(cfg)]  # (no [filter] or [finetune]: no such job)
    assert len(execs) == len(needed) == len(STAGES) - 2  # a job per stage, each through python
    for line in execs:
        assert line.startswith(f"exec {python} -m synthflux ")


def test_apptainer_shim_passes_only_the_model_arguments(tmp_path: Path) -> None:
    from synthflux.slurm import render_apptainer_shim

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apptainer"  # records how it was called
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    fake.chmod(0o755)
    shim = tmp_path / "julia"
    shim.write_text(render_apptainer_shim("/images/j.sif"))
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "pre").mkdir()
    (tmp_path / "w.npz").write_bytes(b"")
    args = ["--project=/repo/julia", "/repo/julia/flux_model.jl", "--input", f"{tmp_path}/pre",
            "--weights", f"{tmp_path}/w.npz", "--batch-size", "8"]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run([str(shim), *args], check=True, env=env)
    assert (tmp_path / "argv").read_text().split("\n")[:-1] == [
        "run", "--cleanenv", "--bind", f"{tmp_path}/pre", "--bind", str(tmp_path),
        "/images/j.sif", "--input", f"{tmp_path}/pre", "--weights", f"{tmp_path}/w.npz",
        "--batch-size", "8",
    ]  # fmt: skip


def test_submit_errors_are_one_line(tmp_path: Path, tiny_model: Path) -> None:
    config, _ = tiny_config(tmp_path, tmp_path / "data", tiny_model)
    no_slurm = {"PATH": str(tmp_path / "empty")}
    cases = [
        ((), {}, "--shards N is required"),
        (("--shards", "0"), {}, "--shards must be at least 1, got 0"),
        (("--resubmit-failed",), {}, "no earlier submission in"),
        (("--shards", "2", "--classify-backend", "apptainer"), {}, "needs --sif"),
        (("--shards", "2"), no_slurm, "sbatch not found: is Slurm installed / are you on a login node?"),
    ]  # fmt: skip
    for args, env, message in cases:
        proc = run_cli("submit", str(config), *args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_status_of_an_empty_data_root(tmp_path: Path, tiny_model: Path) -> None:
    config, _ = tiny_config(tmp_path, tmp_path / "data", tiny_model)
    status = status_json(config)
    assert status["shards"] == 1 and not status["complete"]
    assert status["stages"]["generate"]["incomplete"] == [0]
    assert status["stages"]["preprocess"]["waiting"]
    assert status["stages"]["classify"]["waiting"]


# --- against the cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The same config run here in one process, unsharded: what every cluster run must equal."""
    from synthflux import generate, preprocess, train

    root = tmp_path_factory.mktemp("unsharded")
    _, cfg = tiny_config(root, root / "data", tiny_model, **ONE_PER_BATCH)
    generate.run(cfg)
    preprocess.run(cfg, workers=1)
    train.run(cfg, backend=CLASSIFY_BACKEND)
    return root / "data"


def submit_and_wait(config: Path, *args: str) -> tuple[str, dict[str, str]]:
    out = cli("submit", str(config), *args)
    data = load_config(config).data_root
    ids = job_ids(data)
    wait_for_jobs(list(ids.values()))
    return out, ids


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_three_shards_through_all_stages_equal_the_unsharded_run(
    tmp_path: Path, tiny_model: Path, request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    config, _ = tiny_config(tmp_path, data, tiny_model, **ONE_PER_BATCH)
    out = cli("submit", str(config), "--shards", "3", "--classify-backend", CLASSIFY_BACKEND)
    unsharded = request.getfixturevalue("unsharded")  # made here while the jobs run
    ids = job_ids(data)
    wait_for_jobs(list(ids.values()))
    assert re.search(rf"submitted generate +job {ids['generate']}: array 0-2 \(3 tasks\)", out)
    order = ("generate", "preprocess", "train", "classify", "evaluate", "report")
    assert f"squeue -j {','.join(ids[s] for s in order)}" in out

    states = job_states(list(ids.values()))
    assert set(states.values()) == {"COMPLETED"}, states
    assert len(stage_states(states, ids["generate"])) == 1
    assert sum(k.startswith(ids["generate"] + "_") for k in states) == 3
    logs = sorted(p.name for p in (data / "slurm").glob("*.log"))
    assert logs == sorted(
        [f"{s}-{ids[s]}.log" for s in ("train", "classify", "evaluate", "report")]
        + [
            f"{stage}-{ids[stage]}_{i}.log"
            for stage in ("generate", "preprocess")
            for i in range(3)
        ]
    )
    status = status_json(config)
    assert status["complete"] and status["shards"] == 3, status
    assert_same_as_unsharded(data, unsharded)
    assert "nothing to resubmit" in cli("submit", str(config), "--resubmit-failed")

    # A task killed between writing its part and merging the manifest: every shard is done,
    # but the stage is not, and one generate task (which merges at its end) is resubmitted.
    manifest = data / "generated" / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:5]))
    status = status_json(config)["stages"]["generate"]
    assert not status["complete"] and status["note"] == "manifest not merged yet", status
    plan = cli("submit", str(config), "--resubmit-failed", "--dry-run").splitlines()[0]
    assert plan.endswith(
        "generate tasks 0; preprocess tasks 0-2; train job; classify job; evaluate job; report job"
    ), plan


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_failed_task_stops_later_stages_and_resubmit_completes(
    tmp_path: Path, tiny_model: Path, unsharded: Path
) -> None:
    data = tmp_path / "data"
    config, _ = tiny_config(tmp_path, data, tiny_model, **ONE_PER_BATCH)
    # Shard 1/3 makes cat 1, dog 0 and dog 3, in that order; a folder where dog 3 goes fails
    # its task (even as root) after it made the other two.
    blocker = data / "generated" / "dog" / "dog-000003.png"
    blocker.mkdir(parents=True)
    _, ids = submit_and_wait(config, "--shards", "3", "--classify-backend", CLASSIFY_BACKEND)

    states = job_states(list(ids.values()))
    gen = ids["generate"]
    assert states[f"{gen}_1"] == "FAILED", states
    assert states[f"{gen}_0"] == states[f"{gen}_2"] == "COMPLETED", states
    assert stage_states(states, ids["preprocess"]) == {"CANCELLED"}, states
    assert stage_states(states, ids["classify"]) == {"CANCELLED"}, states
    assert not list((data / "slurm").glob("preprocess-*.log")), "preprocess must not have run"
    assert not (data / "preprocessed").exists()
    status = status_json(config)
    assert status["stages"]["generate"]["incomplete"] == [1], status
    assert status["stages"]["preprocess"]["waiting"]

    blocker.rmdir()  # the user fixes the problem
    plan = cli("submit", str(config), "--resubmit-failed", "--dry-run", "--python", PYTHON)
    assert plan.splitlines()[0] == (
        "resubmitting what the data shows incomplete: "
        "generate tasks 1; preprocess tasks 0-2; train job; classify job; evaluate job; report job"
    )
    check_golden("resubmit-failed.txt", normalise(plan, tmp_path))

    out, new_ids = submit_and_wait(config, "--resubmit-failed")
    assert re.search(rf"submitted generate +job {new_ids['generate']}: array 1 \(1 task\)", out)
    states = job_states(list(new_ids.values()))
    assert set(states.values()) == {"COMPLETED"}, states
    # The task resumed: the images its failed run wrote (4 and 7) were kept, not made again.
    log = (data / "slurm" / f"generate-{new_ids['generate']}_1.log").read_text()
    assert "shard 1/3: 3 images planned, 2 already done, 1 generated" in log, log
    assert status_json(config)["complete"]
    assert_same_as_unsharded(data, unsharded)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_cancelled_task_is_resubmitted_alone(
    tmp_path: Path, tiny_model: Path, unsharded: Path
) -> None:
    data = tmp_path / "data"
    config, _ = tiny_config(tmp_path, data, tiny_model, **ONE_PER_BATCH)
    cli("submit", str(config), "--shards", "3", "--classify-backend", CLASSIFY_BACKEND)
    ids = job_ids(data)
    gen = ids["generate"]

    # Another submission onto the same data while this one is queued is refused.
    proc = run_cli("submit", str(config), "--shards", "3")
    assert proc.returncode == 2 and "still queued or running" in proc.stderr, proc.stderr

    deadline = time.monotonic() + 60
    while True:  # cancel task 2 once it runs (it needs seconds to load the model)
        state = subprocess.run(
            ["squeue", "-h", "-j", f"{gen}_2", "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state == "RUNNING":
            break
        assert state == "PENDING" and time.monotonic() < deadline, f"task 2 is {state!r}"
        time.sleep(0.1)
    subprocess.run(["scancel", f"{gen}_2"], check=True)
    wait_for_jobs(list(ids.values()))

    states = job_states(list(ids.values()))
    assert states[f"{gen}_2"] == "CANCELLED", states
    assert states[f"{gen}_0"] == states[f"{gen}_1"] == "COMPLETED", states
    assert stage_states(states, ids["preprocess"]) == {"CANCELLED"}, states
    assert not list((data / "slurm").glob("preprocess-*.log")), "preprocess must not have run"
    assert status_json(config)["stages"]["generate"]["incomplete"] == [2]

    out, new_ids = submit_and_wait(config, "--resubmit-failed")
    assert (
        "generate tasks 2; preprocess tasks 0-2; train job; classify job; evaluate job; report job"
        in out
    )
    assert set(job_states(list(new_ids.values())).values()) == {"COMPLETED"}
    assert status_json(config)["complete"]
    assert_same_as_unsharded(data, unsharded)
