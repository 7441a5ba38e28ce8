"""`synthflux submit`: the pipeline as Slurm job arrays, one job per stage (pipeline.STAGES).

`synthflux submit CONFIG --shards N` submits one job per stage, each waiting for the previous:

    generate    array 0..N-1, task i runs `synthflux generate CONFIG --data DATA --shard i/N`
    preprocess  array 0..N-1, task i runs `synthflux preprocess ... --shard i/N`   (afterok)
    train       one job running `synthflux train CONFIG --data DATA`             (afterok)
    classify    one job running `synthflux classify CONFIG --data DATA`          (afterok)
    evaluate    one job running `synthflux evaluate CONFIG --data DATA`          (afterok)
    report      one job running `synthflux report CONFIG --data DATA`            (afterok)

Everything per stage comes from its declaration (synthflux.stages.Stage): a sharded stage is
an array with --shard, a stage that does not apply to the config is left out, those that use
a GPU get --gpus-per-task, those that run the CNN get --backend (submit's --classify-backend),
and `node_args` adds its own arguments.

`synthflux status CONFIG` (synthflux.status) reads completion from the files the stages write,
never from the scheduler, and `submit --resubmit-failed` resubmits exactly the shards status
calls incomplete, plus the stages after them. Every stage resumes from what it wrote, so a task simply runs again.

Why plain sbatch scripts rendered from a template, not submitit: a task here is a command line
(`synthflux generate --shard i/N`), not a Python callable, so submitit's pickling, its result
files and the sacct polling it needs buy nothing; job arrays, `afterok` dependencies and
`--requeue` are one sbatch option each; a rendered script can be read by a person, copied to
another cluster, golden-tested byte for byte, and shown by `--dry-run`; and no new dependency
has to match the cluster's Slurm version (the reasons, the options and the plan make this module
longer than most). The scripts are written to DATA/slurm/ (with the
job logs) and `sbatch` submits them; nothing here waits on or polls the scheduler, except the
one `squeue` check that refuses to submit while jobs of the last submission are queued.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from synthflux import pipeline
from synthflux.config import PipelineConfig
from synthflux.errors import SubmitError
from synthflux.layout import DataLayout
from synthflux.stages import Stage
from synthflux.status import Status, pipeline_status
from synthflux.submission import APPTAINER, node_backend, read_submission, record_submission

log = logging.getLogger("synthflux")


def cnn_stages() -> set[str]:
    """The stages that run the CNN (or read its results): --classify-backend is theirs."""
    return {st.name for st in pipeline.STAGES if st.runs_cnn}


class _Template(string.Template):
    delimiter = "@"  # the scripts are full of shell `$`; `@@` in a template is a literal `@`


def _template(name: str) -> _Template:
    return _Template(resources.files("synthflux").joinpath(f"templates/{name}").read_text())


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
    classify_backend: str | None = None  # None: the config's cnn.backend
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
        return DataLayout(self.data).slurm


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


def _command(st: Stage, paths: Paths, opts: SubmitOptions) -> str:
    q = shlex.quote
    # A path, or a command line such as "apptainer exec --nv synthflux-python.sif python".
    python = q(opts.python) if Path(opts.python).exists() else shlex.join(shlex.split(opts.python))
    cmd = f"{python} -m synthflux {st.name} {q(str(paths.config))} --data {q(str(paths.data))}"
    if st.sharded:
        cmd += f' --shard "${{SLURM_ARRAY_TASK_ID}}/{opts.shards}"'
    if st.node_args:
        cmd += f" {st.node_args}"
    backend = node_backend(opts.classify_backend)
    return cmd + (f" --backend {q(backend)}" if backend and st.runs_cnn else "")


def render_script(
    stage: str, paths: Paths, opts: SubmitOptions, tasks: list[int] | None, after: bool = True
) -> str:
    """The batch script of one stage; `tasks` are the array indices (None: a single job);
    `after`: it waits for the job before it in the submission."""
    st = pipeline.stage(stage)
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
    if after:
        directives.append("--kill-on-invalid-dep=yes")  # a failed dependency cancels, never hangs
    if opts.partition:
        directives.append(f"--partition={opts.partition}")
    if opts.time:
        directives.append(f"--time={opts.time}")
    if opts.cpus_per_task:
        directives.append(f"--cpus-per-task={opts.cpus_per_task}")
    if st.uses_gpu and opts.gpus_per_task:
        directives.append(f"--gpus-per-task={opts.gpus_per_task}")
    directives.extend(opts.sbatch_options)
    setup = ""
    if st.runs_cnn and opts.classify_backend == APPTAINER:
        setup = f"export PATH={shlex.quote(str(paths.slurm / 'bin'))}:$PATH\n"
    return _template("slurm-job.sbatch").substitute(
        stage=stage,
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        setup=setup,
        command=_command(st, paths, opts),
    )


def render_apptainer_shim(sif: str) -> str:
    return _template("apptainer-julia.sh").substitute(sif=shlex.quote(sif))


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


@dataclass
class Plan:
    """Which tasks of which stages to submit; stages absent here are complete."""

    tasks: dict[str, list[int] | None]

    @classmethod
    def full(cls, cfg: PipelineConfig, shards: int) -> Plan:
        return cls({st.name: list(range(shards)) if st.sharded else None
                    for st in pipeline.STAGES if st.applies(cfg)})  # fmt: skip

    @classmethod
    def failed(cls, status: Status) -> Plan:
        """The first incomplete stage's incomplete tasks, and every stage after it whole.

        A stage whose every task is done but which is not complete (a task was killed before
        its final merge) needs just one task: any task merges at its end. A new result can
        change every input of the stages after it, so they run whole (verified work skips).
        """
        tasks: dict[str, list[int] | None] = {}
        for st in pipeline.STAGES:
            state = status.stages[st.name]
            if not state.needed:
                continue
            if tasks:
                tasks[st.name] = list(range(status.shards)) if st.sharded else None
            elif not state.complete:
                tasks[st.name] = (state.incomplete() or [0]) if st.sharded else None
        return cls(tasks)


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
        (
            stage,
            paths.slurm / f"{stage}.sbatch",
            render_script(stage, paths, opts, tasks, i > 0),
            tasks,
        )
        for i, (stage, tasks) in enumerate(plan.tasks.items())
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
    if opts.classify_backend == APPTAINER and cnn_stages() & set(plan.tasks):
        out.append(f"# {paths.slurm / 'bin' / 'julia'} (the classify job's `julia`)")
        out.append(render_apptainer_shim(opts.sif or "").rstrip("\n"))
    return out


def submit(plan: Plan, paths: Paths, opts: SubmitOptions) -> list[Submitted]:
    """Write the scripts to DATA/slurm/ and submit them, each stage after the previous one."""
    paths.slurm.mkdir(parents=True, exist_ok=True)
    if opts.classify_backend == APPTAINER and cnn_stages() & set(plan.tasks):
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
    record_submission(DataLayout(paths.data), str(paths.config), asdict(opts),
                      {j.stage: {"id": j.job_id, "tasks": j.tasks} for j in jobs})  # fmt: skip


def plan_submission(
    cfg: PipelineConfig, config_path: Path, given: dict[str, Any], resubmit: bool
) -> tuple[Plan, Paths, SubmitOptions, Status | None]:
    """Resolve options (a resubmit reuses the last submission's) and what to submit."""
    data = cfg.data_root.resolve()
    paths = Paths(config_path.resolve(), data, Path.cwd())
    given = {k: v for k, v in given.items() if v is not None}
    previous = read_submission(DataLayout(data))
    if resubmit:
        if previous is None and "shards" not in given:
            raise SubmitError(
                f"no earlier submission in {data / 'slurm'}: give --shards N to resubmit anyway"
            )
        stored = dict(previous["options"]) if previous else {}
        opts = SubmitOptions.from_json(stored | given)
        # Complete as the nodes would find it: the CNN stages' results belong to a backend.
        on_nodes = cfg.with_cnn(backend=node_backend(opts.classify_backend))
        status = pipeline_status(on_nodes, opts.shards)
        return Plan.failed(status), paths, opts, status
    if "shards" not in given:
        raise SubmitError(
            "--shards N is required (or --resubmit-failed to repeat the last submission)"
        )
    return Plan.full(cfg, given["shards"]), paths, SubmitOptions.from_json(given), None


def check_not_running(data: Path) -> None:
    previous = read_submission(DataLayout(data))
    if previous is None:
        return
    ids = sorted((j["id"] for j in previous.get("jobs", {}).values()), key=lambda i: (len(i), i))
    busy = _queued(ids)
    if busy:
        listed = ",".join(busy)
        raise SubmitError(
            f"jobs {listed} of the last submission are still queued or running on {data}: wait "
            f"for them (`squeue -j {listed}`) or cancel them (`scancel {listed}`) first"
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
