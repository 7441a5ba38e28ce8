"""Cluster batch submission: the pipeline as Slurm job arrays, and its status from the data.

`synthflux submit CONFIG --shards N` submits three jobs, each waiting for the previous one:

    generate    array 0..N-1, task i runs `synthflux generate CONFIG --data DATA --shard i/N`
    preprocess  array 0..N-1, task i runs `synthflux preprocess ... --shard i/N`   (afterok)
    classify    one job running `synthflux classify CONFIG --data DATA`              (afterok)

`synthflux status CONFIG` reads completion from the files the stages write -- generate's part
records, preprocess's shard markers, classify's stage.json -- never from the scheduler, and
`submit --resubmit-failed` resubmits exactly the shards status calls incomplete, plus the
stages after them. Every stage resumes from what it wrote, so a task simply runs again.

Why plain sbatch scripts rendered from a template, not submitit: a task here is a command line
(`synthflux generate --shard i/N`), not a Python callable, so submitit's pickling, its result
files and the sacct polling it needs buy nothing; job arrays, `afterok` dependencies and
`--requeue` are one sbatch option each; a rendered script can be read by a person, copied to
another cluster, golden-tested byte for byte, and shown by `--dry-run`; and no new dependency
has to match the cluster's Slurm version. The scripts are written to DATA/slurm/ (with the
job logs) and `sbatch` submits them; nothing here waits on or polls the scheduler, except the
one `squeue` check that refuses to submit while jobs of the last submission are queued.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from synthflux.config import PipelineConfig
from synthflux.errors import DataError, SynthfluxError
from synthflux.storage import read_jsonl, write_json_atomic

log = logging.getLogger("synthflux")

SUBMISSION = "submission.json"  # DATA/slurm/: the last submission's options and job ids
APPTAINER = "apptainer"  # the --classify-backend handled here (classify sees "local")
MODEL_KEYS = ("model_revision", "scheduler")  # record fields status cannot know cheaply


class SubmitError(SynthfluxError):
    """Slurm is missing or refused a submission, or the submit options are invalid."""


class _Template(string.Template):
    delimiter = "@"  # the scripts are full of shell `$`; `@@` in a template is a literal `@`


def _template(name: str) -> _Template:
    return _Template(resources.files("synthflux").joinpath("templates", name).read_text())


# --- options and scripts ---------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitOptions:
    """Everything that shapes the batch scripts; stored with each submission for resubmits."""

    shards: int
    partition: str | None = None
    gpus_per_task: int | None = None  # generate only: the other stages use no GPU
    cpus_per_task: int | None = None
    time: str | None = None
    max_parallel: int | None = None
    classify_backend: str | None = None  # None: the config's classify.backend
    sif: str | None = None  # the Apptainer image, for classify_backend "apptainer"
    python: str = field(default_factory=lambda: sys.executable)
    sbatch_options: tuple[str, ...] = ()  # extra `#SBATCH` lines, e.g. "--account=abc"

    def __post_init__(self) -> None:
        for name in ("shards", "gpus_per_task", "cpus_per_task", "max_parallel"):
            value, least = getattr(self, name), 0 if name == "gpus_per_task" else 1
            if value is not None and value < least:
                flag = "--" + name.replace("_", "-")
                raise SubmitError(f"{flag} must be at least {least}, got {value}")
        if self.classify_backend == APPTAINER and not self.sif:
            raise SubmitError(
                "--classify-backend apptainer needs --sif IMAGE.sif (see docs/cluster.md)"
            )
        for opt in self.sbatch_options:
            if not opt.startswith("-"):
                raise SubmitError(
                    f"--sbatch-option must be an sbatch option like --qos=X, got {opt!r}"
                )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SubmitOptions:
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["sbatch_options"] = tuple(raw.get("sbatch_options", ()))
        return cls(**raw)


@dataclass(frozen=True)
class Paths:
    """Absolute paths baked into the scripts (the jobs may start in any folder)."""

    config: Path
    data: Path
    cwd: Path  # --chdir: relative paths inside the config resolve as they did here

    @property
    def slurm(self) -> Path:
        return self.data / "slurm"


def array_spec(tasks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts: list[str] = []
    start = prev = tasks[0]
    for t in [*tasks[1:], None]:
        if t is not None and t == prev + 1:
            prev = t
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if t is not None:
            start = prev = t
    return ",".join(parts)


def _command(stage: str, paths: Paths, opts: SubmitOptions) -> str:
    q = shlex.quote
    # A path, or a command line such as "apptainer exec --nv synthflux-python.sif python".
    python = q(opts.python) if Path(opts.python).exists() else shlex.join(shlex.split(opts.python))
    cmd = f"{python} -m synthflux {stage} {q(str(paths.config))} --data {q(str(paths.data))}"
    if stage == "generate":
        return cmd + f' --shard "${{SLURM_ARRAY_TASK_ID}}/{opts.shards}"'
    if stage == "preprocess":
        # os.cpu_count() on a node counts CPUs this task was not given.
        return (
            cmd + f' --shard "${{SLURM_ARRAY_TASK_ID}}/{opts.shards}"'
            ' --workers "${SLURM_CPUS_PER_TASK:-1}"'
        )
    backend = opts.classify_backend
    if backend == APPTAINER:
        backend = "local"  # `julia` on PATH is the apptainer shim written beside the script
    return cmd + (f" --backend {q(backend)}" if backend else "")


def render_script(stage: str, paths: Paths, opts: SubmitOptions, tasks: list[int] | None) -> str:
    """The batch script of one stage; `tasks` are the array indices (None: a single job)."""
    log_name = f"{stage}-%A_%a.log" if tasks is not None else f"{stage}-%j.log"
    directives = [
        f"--job-name=synthflux-{stage}",
        f"--output={paths.slurm / log_name}",
        "--open-mode=append",  # a requeued task adds to its log instead of replacing it
        f"--chdir={paths.cwd}",
        "--ntasks=1",
        "--requeue",  # preempted or node lost: run again (and resume)
    ]
    if tasks is not None:
        throttle = f"%{opts.max_parallel}" if opts.max_parallel else ""
        directives.append(f"--array={array_spec(tasks)}{throttle}")
    if stage != "generate":
        directives.append("--kill-on-invalid-dep=yes")  # a failed dependency cancels, never hangs
    if opts.partition:
        directives.append(f"--partition={opts.partition}")
    if opts.time:
        directives.append(f"--time={opts.time}")
    if opts.cpus_per_task:
        directives.append(f"--cpus-per-task={opts.cpus_per_task}")
    if stage == "generate" and opts.gpus_per_task:
        directives.append(f"--gpus-per-task={opts.gpus_per_task}")
    directives.extend(opts.sbatch_options)
    setup = ""
    if stage == "classify" and opts.classify_backend == APPTAINER:
        setup = f"export PATH={shlex.quote(str(paths.slurm / 'bin'))}:$PATH\n"
    return _template("slurm-job.sbatch").substitute(
        stage=stage,
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        setup=setup,
        command=_command(stage, paths, opts),
    )


def render_apptainer_shim(sif: str) -> str:
    return _template("apptainer-julia.sh").substitute(sif=shlex.quote(sif))


# --- status: completion read from the data --------------------------------------------------


@dataclass
class ShardState:
    index: int
    done: int  # images (generate) or output shards (preprocess, classify) complete
    total: int

    @property
    def complete(self) -> bool:
        return self.done >= self.total


@dataclass
class StageStatus:
    stage: str
    shards: list[ShardState]
    complete: bool
    note: str = ""
    waiting: bool = False  # the stage before is incomplete, so this one's shards are unknown

    def incomplete(self) -> list[int]:
        return [s.index for s in self.shards if not s.complete]


@dataclass
class Status:
    shards: int
    stages: dict[str, StageStatus]

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.stages.values())

    def lines(self) -> list[str]:
        out = []
        for st in self.stages.values():
            state = "complete" if st.complete else "incomplete"
            head = f"{st.stage:<11} {state:<10}"
            if st.waiting:
                out.append(f"{head} waiting for the stage before it")
                continue
            if st.stage != "classify":
                head += f" {sum(s.complete for s in st.shards)}/{len(st.shards)} tasks done"
            out.append((head + (f"  ({st.note})" if st.note else "")).rstrip())
            unit = "images" if st.stage == "generate" else "output shards"
            for s in st.shards:
                where = f"task {s.index}/{self.shards}" if st.stage != "classify" else "job"
                mark = "done" if s.complete else "missing"
                count = f"{s.done}/{s.total}"
                out.append(f"  {where:<10} {count:>9} {unit:<13} {mark}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "complete": self.complete,
            "stages": {
                name: {
                    "complete": st.complete,
                    "note": st.note,
                    "waiting": st.waiting,
                    "incomplete": st.incomplete(),
                    "shards": [asdict(s) for s in st.shards],
                }
                for name, st in self.stages.items()
            },
        }


def _generate_status(cfg: PipelineConfig, n: int) -> StageStatus:
    from synthflux.generate import ModelRef, base_record, generated_dir, image_seed, plan_images

    out = generated_dir(cfg)
    records: dict[int, dict[str, Any]] = {}
    for part in sorted((out / "parts").glob("part-*.jsonl")):
        for rec in read_jsonl(part):
            records[rec["id"]] = rec
    # The stage's own record, less the two fields that need the model loaded to know.
    model = ModelRef(path="", name=cfg.generate.model, revision="", scheduler="")
    shards = [ShardState(i, 0, 0) for i in range(n)]
    made: set[int] = set()  # ids with an image (not dropped): what the manifest must list
    for job in plan_images(cfg):
        shard = shards[job.id % n]
        shard.total += 1
        rec = records.get(job.id)
        if rec is None:
            continue
        base = base_record(job, cfg, model)
        if any(rec.get(k) != v for k, v in base.items() if k not in MODEL_KEYS):
            continue  # made under another config: generate will make it again
        attempt = rec.get("attempt")
        if not isinstance(attempt, int) or rec.get("seed") != image_seed(
            cfg.seed, job.class_name, job.index, attempt
        ):
            continue
        if rec.get("status") == "dropped":
            shard.done += 1
        elif (out / job.file).is_file():
            shard.done += 1
            made.add(job.id)
    if not all(s.complete for s in shards):
        return StageStatus("generate", shards, False)
    # A task killed between writing its part and merging leaves the manifest behind.
    manifest = out / "manifest.jsonl"
    merged = manifest.is_file() and {r["id"] for r in read_jsonl(manifest)} == made
    return StageStatus("generate", shards, merged, "" if merged else "manifest not merged yet")


def _preprocess_status(cfg: PipelineConfig, n: int, generated: bool) -> StageStatus:
    # The stage's own definition of a finished output shard, so status agrees with a re-run.
    from synthflux.preprocess import preprocessed_dir, shard_states

    shards = [ShardState(i, 0, 0) for i in range(n)]
    if not generated:
        return StageStatus("preprocess", shards, False, waiting=True)
    out = preprocessed_dir(cfg)
    done_files: list[tuple[str, str]] = []
    for k, info in shard_states(cfg):
        task = shards[k % n]
        task.total += 1
        if info is not None:
            task.done += 1
            done_files.append((info["file"], info["sha256"]))
    try:
        dataset = json.loads((out / "dataset.json").read_text())
        listed = [(s["file"], s["sha256"]) for s in dataset["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    shards_done = all(s.complete for s in shards)
    complete = shards_done and listed == done_files
    note = "" if complete or not shards_done else "dataset.json not written yet"
    return StageStatus("preprocess", shards, complete, note)


def _classify_status(cfg: PipelineConfig, preprocessed: bool) -> StageStatus:
    dataset = cfg.data_root / "preprocessed" / "dataset.json"
    if not preprocessed:
        return StageStatus("classify", [ShardState(0, 0, 0)], False, waiting=True)
    from synthflux.classify import is_current

    shard_files = [s["file"] for s in json.loads(dataset.read_text())["shards"]]
    # The same question `run` asks: predictions made from exactly these shards' bytes.
    complete = is_current(cfg)
    probs = len(shard_files) if complete else 0
    note = "" if complete else "no predictions for the current shards yet"
    return StageStatus("classify", [ShardState(0, probs, len(shard_files))], complete, note)


def pipeline_status(cfg: PipelineConfig, shards: int) -> Status:
    gen = _generate_status(cfg, shards)
    pre = _preprocess_status(cfg, shards, gen.complete)
    cls = _classify_status(cfg, pre.complete)
    return Status(shards, {"generate": gen, "preprocess": pre, "classify": cls})


# --- submission ----------------------------------------------------------------------------


def _run_slurm(cmd: list[str], what: str) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise SubmitError(f"{cmd[0]} not found: is Slurm installed / are you on a login node?")
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SubmitError(
            f"{what}: {cmd[0]} did not answer within 120 s (slurmctld down?)"
        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
        raise SubmitError(f"{what}: {lines[-1].removeprefix(f'{cmd[0]}: error: ')}")
    return proc.stdout


def _sbatch(script: Path, after: str | None) -> str:
    dep = [f"--dependency=afterok:{after}"] if after else []
    out = _run_slurm(["sbatch", "--parsable", *dep, str(script)], f"sbatch {script}")
    return out.strip().split(";")[0]  # "<id>[;<cluster>]"


def _queued(job_ids: list[str]) -> list[str]:
    """Which of these jobs (arrays) are still pending or running."""
    if not job_ids:
        return []
    out = _run_slurm(["squeue", "--noheader", "--format=%F"], "squeue")
    in_queue = {line.strip() for line in out.splitlines()}
    return [j for j in job_ids if j in in_queue]


def read_submission(data: Path) -> dict[str, Any] | None:
    path = data / "slurm" / SUBMISSION
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it to submit afresh") from None


@dataclass
class Plan:
    """Which tasks of which stages to submit; stages absent here are complete."""

    tasks: dict[str, list[int] | None]

    @classmethod
    def full(cls, shards: int) -> Plan:
        return cls(
            {"generate": list(range(shards)), "preprocess": list(range(shards)), "classify": None}
        )

    @classmethod
    def failed(cls, status: Status) -> Plan:
        gen, pre = status.stages["generate"], status.stages["preprocess"]
        all_tasks = list(range(status.shards))
        if not gen.complete:
            # A new manifest can change every output shard: preprocess all (verified ones skip).
            # No shard missing means only the manifest merge is: any one task does it at its end.
            missing = gen.incomplete() or [0]
            return cls({"generate": missing, "preprocess": all_tasks, "classify": None})
        if not pre.complete:
            # All shards done but no dataset.json: any one task writes it at its end.
            return cls({"preprocess": pre.incomplete() or [0], "classify": None})
        if not status.stages["classify"].complete:
            return cls({"classify": None})
        return cls({})


@dataclass
class Submitted:
    stage: str
    job_id: str
    tasks: list[int] | None
    script: Path


def _write_scripts(
    plan: Plan, paths: Paths, opts: SubmitOptions
) -> list[tuple[str, Path, str, list[int] | None]]:
    return [
        (stage, paths.slurm / f"{stage}.sbatch", render_script(stage, paths, opts, tasks), tasks)
        for stage, tasks in plan.tasks.items()
    ]


def dry_run(plan: Plan, paths: Paths, opts: SubmitOptions) -> list[str]:
    """The scripts and sbatch commands a submission would use; nothing is written."""
    out: list[str] = []
    prev = None
    for stage, script, text, _ in _write_scripts(plan, paths, opts):
        dep = f" --dependency=afterok:<{prev} job id>" if prev else ""
        out.append(f"# sbatch --parsable{dep} {script}")
        out.append(text.rstrip("\n"))
        prev = stage
    if opts.classify_backend == APPTAINER and "classify" in plan.tasks:
        out.append(f"# {paths.slurm / 'bin' / 'julia'} (the classify job's `julia`)")
        out.append(render_apptainer_shim(opts.sif or "").rstrip("\n"))
    return out


def submit(plan: Plan, paths: Paths, opts: SubmitOptions) -> list[Submitted]:
    """Write the scripts to DATA/slurm/ and submit them, each stage after the previous one."""
    paths.slurm.mkdir(parents=True, exist_ok=True)
    if opts.classify_backend == APPTAINER and "classify" in plan.tasks:
        shim = paths.slurm / "bin" / "julia"
        shim.parent.mkdir(exist_ok=True)
        shim.write_text(render_apptainer_shim(opts.sif or ""))
        shim.chmod(0o755)
    done: list[Submitted] = []
    for stage, script, text, tasks in _write_scripts(plan, paths, opts):
        script.write_text(text)
        try:
            job = _sbatch(script, done[-1].job_id if done else None)
        except SubmitError as e:
            if done:  # say what is already queued, so the user can cancel or keep it
                ids = ",".join(s.job_id for s in done)
                raise SubmitError(
                    f"{e} (already submitted: {ids}; `scancel {ids}` to drop them)"
                ) from None
            raise
        done.append(Submitted(stage, job, tasks, script))
    return done


def _record(paths: Paths, opts: SubmitOptions, jobs: list[Submitted]) -> None:
    write_json_atomic(
        paths.slurm / SUBMISSION,
        {
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": str(paths.config),
            "options": asdict(opts),
            "jobs": {j.stage: {"id": j.job_id, "tasks": j.tasks} for j in jobs},
        },
    )


def plan_submission(
    cfg: PipelineConfig, config_path: Path, given: dict[str, Any], resubmit: bool
) -> tuple[Plan, Paths, SubmitOptions, Status | None]:
    """Resolve options (a resubmit reuses the last submission's) and what to submit."""
    data = cfg.data_root.resolve()
    paths = Paths(config_path.resolve(), data, Path.cwd())
    given = {k: v for k, v in given.items() if v is not None}
    previous = read_submission(data)
    if resubmit:
        if previous is None and "shards" not in given:
            raise SubmitError(
                f"no earlier submission in {data / 'slurm'}: give --shards N to resubmit anyway"
            )
        stored = dict(previous["options"]) if previous else {}
        opts = SubmitOptions.from_json(stored | given)
        status = pipeline_status(cfg, opts.shards)
        return Plan.failed(status), paths, opts, status
    if "shards" not in given:
        raise SubmitError(
            "--shards N is required (or --resubmit-failed to repeat the last submission)"
        )
    return Plan.full(given["shards"]), paths, SubmitOptions.from_json(given), None


def check_not_running(data: Path) -> None:
    previous = read_submission(data)
    if previous is None:
        return
    ids = sorted((j["id"] for j in previous.get("jobs", {}).values()), key=lambda i: (len(i), i))
    busy = _queued(ids)
    if busy:
        ids = ",".join(busy)
        raise SubmitError(
            f"jobs {ids} of the last submission are still queued or running on {data}: wait "
            f"for them (`squeue -j {ids}`) or cancel them (`scancel {ids}`) first"
        )


def describe(jobs: list[Submitted], paths: Paths, target: str) -> list[str]:
    out = []
    prev = None
    for j in jobs:
        n = len(j.tasks or [])
        what = f"array {array_spec(j.tasks)} ({n} task{'s' * (n != 1)})" if j.tasks else "1 job"
        after = f", after {prev} succeeds" if prev else ""
        out.append(f"submitted {j.stage:<10} job {j.job_id}: {what}{after}")
        prev = j.stage
    ids = ",".join(j.job_id for j in jobs)
    out += [
        f"logs:     {paths.slurm}/<stage>-<job>_<task>.log",
        f"follow:   squeue -j {ids}    sacct -X -j {ids}",
        f"progress: synthflux status {target}",
        f"failed or cancelled tasks: synthflux submit {target} --resubmit-failed",
    ]
    return out


def submit_pipeline(
    cfg: PipelineConfig,
    config_path: Path,
    given: dict[str, Any],
    *,
    resubmit: bool = False,
    dry: bool = False,
) -> list[str]:
    """`synthflux submit`: plan, then print (--dry-run) or submit and record; return the report."""
    plan, paths, opts, status = plan_submission(cfg, config_path, given, resubmit)
    out: list[str] = []
    if status is not None:
        if not plan.tasks:
            return ["nothing to resubmit: every stage is complete (synthflux status shows it)"]
        todo = [f"{st} {'tasks ' + array_spec(t) if t else 'job'}" for st, t in plan.tasks.items()]
        out.append("resubmitting what the data shows incomplete: " + "; ".join(todo))
    if dry:
        return out + dry_run(plan, paths, opts)
    check_not_running(paths.data)
    jobs = submit(plan, paths, opts)
    _record(paths, opts, jobs)
    return out + describe(jobs, paths, f"{shlex.quote(str(config_path))} --data {paths.data}")


def status_shards(cfg: PipelineConfig, shards: int | None) -> int:
    """--shards, else the last submission's, else 1 (status is the same data either way)."""
    if shards is not None:
        if shards < 1:
            raise SubmitError(f"--shards must be at least 1, got {shards}")
        return shards
    previous = read_submission(cfg.data_root)
    return int(previous["options"]["shards"]) if previous else 1
