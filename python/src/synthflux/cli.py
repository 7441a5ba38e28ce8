"""The `synthflux` command: a thin argparse layer over the stage functions.

Every stage's command is built from its declaration in `pipeline.STAGES` (help, options,
--backend/--image for the CNN's stages); `import`, `run`, `submit`, `status`, `tiny-model` and
`digits` are written out below. Errors a user can fix (SynthfluxError, bad arguments, OS
errors) print as one line and exit 2; Ctrl-C and SIGTERM exit 130; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from synthflux import __version__
from synthflux.config import BACKENDS, PipelineConfig
from synthflux.errors import SynthfluxError
from synthflux.stages import at_least, shard_spec

# The stages are imported when the parser is built, inside main's handling of Ctrl-C.

log = logging.getLogger("synthflux")

DATA_HELP = "data root (overrides data_root in the config); all stages read and write under it"
BACKEND_HELP = (
    "where the CNN runs: auto (docker if the Julia image is there, else a local julia with "
    "Flux and NPZ, else reference), docker (the image, with the Docker engine), local "
    "(`julia julia/flux_model.jl` here), reference (the same network in PyTorch, in-process, "
    "no Julia needed), none (only collect what another process wrote) (default: cnn.backend "
    "in the config, auto). Results belong to the backend that made them"
)
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command(
    sub: Any, name: str, func: Handler, help: str, description: str, config: bool = True
) -> argparse.ArgumentParser:
    """A subcommand calling `func`; with `config`, its CONFIG and --data arguments."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    if config:
        p.add_argument("config", help="pipeline config (TOML), e.g. examples/tiny.toml")
        p.add_argument("--data", metavar="DIR", help=DATA_HELP)
    p.set_defaults(func=func)
    return p


def _backend_option(p: argparse.ArgumentParser, help: str = BACKEND_HELP) -> None:
    p.add_argument("--backend", choices=BACKENDS, help=help)
    p.add_argument(
        "--image", metavar="TAG",
        help="Docker image holding flux_model.jl (default: cnn.image, synthflux-julia:latest; "
        "build it with `make images`)",
    )  # fmt: skip


def _config(args: argparse.Namespace) -> PipelineConfig:
    from synthflux.config import load_config

    return load_config(args.config, data_root=args.data, devices=getattr(args, "devices", None))


def _devices_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices", type=_devices, metavar="all|LIST",
        help="make images (and LoRA fits) on several local devices at once, one worker each: "
        "'all' (every visible GPU) or a list such as cuda:0,cuda:2 (overrides [generate] "
        "devices; the images are the same bytes as one process makes)",
    )  # fmt: skip


def _devices(text: str) -> str | list[str]:
    from synthflux.device_names import parse_devices

    try:
        return parse_devices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print(lines: list[str]) -> int:
    """A command's summary on stdout (logs and progress go to stderr)."""
    for line in lines:
        print(line)
    return 0


# --- a stage's command, from its declaration --------------------------------------------------


def _stage_command(sub: Any, st: Any) -> None:
    p = _command(sub, st.name, _run_stage, st.help, st.description)
    dests = [p.add_argument(*o.flags, **o.settings).dest for o in st.options]
    if st.runs_cnn:
        _backend_option(p)
        dests += ["backend", "image"]
    if st.spreads:
        _devices_option(p)
    p.set_defaults(stage=st, dests=dests)


def _run_stage(args: argparse.Namespace) -> int:
    summary = args.stage.run(_config(args), **{d: getattr(args, d) for d in args.dests})
    return _print([f"{args.stage.name}: {line}" for line in summary.lines()])


# --- the commands ---------------------------------------------------------------------------


def _import(sub: Any) -> None:
    p = _command(
        sub,
        "import",
        cmd_import,
        "real images from a folder (FOLDER/<class>/<images>) as a training or test source",
        "Copy an ImageFolder -- FOLDER/<class>/<images>, at any depth below the class "
        "folder, any format Pillow reads -- into DATA/imported/NAME/ with a manifest record "
        "per image (source 'real', the original path, sha256); preprocess then treats it "
        "like the generated images. The class folders must be the config's classes. The "
        "originals are never modified; importing an unchanged folder again does nothing, a "
        "changed file is read again, a removed one removed.",
    )
    p.add_argument("folder", type=Path, help="the ImageFolder to import")
    p.add_argument("--as", dest="split", choices=("train", "test"), required=True,
                   help="train: a training source (train.sources = [\"real\"] uses it); "
                   "test: a test set, evaluated on, never trained on")  # fmt: skip
    p.add_argument("--name", metavar="NAME", help="the source's name (default: the split), "
                   "for several test sets")  # fmt: skip
    p.add_argument("--classes-subset", action="store_true",
                   help="allow classes without a folder (a test set of some classes only)")  # fmt: skip


def cmd_import(args: argparse.Namespace) -> int:
    from synthflux import ingest

    summary = ingest.run(_config(args), args.folder, split=args.split, name=args.name,
                         classes_subset=args.classes_subset)  # fmt: skip
    return _print([f"import: {line}" for line in summary.lines()])


def _run(sub: Any) -> None:
    from synthflux.pipeline import STAGES

    names = [st.name for st in STAGES]
    p = _command(
        sub,
        "run",
        cmd_run,
        "all stages in order: " + " -> ".join(names),
        "Run the stages in order: "
        + "; ".join(f"{st.name} -- {st.help}" for st in STAGES)
        + ". A stage the config does not need is left out (generate, when [train] sources has "
        "no synthetic). Each stage keeps what is complete and verified, so `run` after an "
        "interruption resumes; --from STAGE deletes that stage's outputs (and later ones) and "
        "redoes them.",
    )
    p.add_argument("--from", dest="from_stage", choices=names, metavar="STAGE",
                   help="redo from this stage (one of: " + ", ".join(names) + "): its outputs "
                   "and later stages' are deleted first, once the CNN's backend is known to "
                   "run")  # fmt: skip
    _backend_option(p)
    _devices_option(p)


def cmd_run(args: argparse.Namespace) -> int:
    from synthflux.pipeline import run_pipeline

    # Where the CNN runs belongs to its results: run_pipeline resolves "auto" once, and each
    # stage is asked whether it is complete for that backend, as `status --backend` asks.
    cfg = _config(args).with_cnn(backend=args.backend, image=args.image)
    run_pipeline(cfg, from_stage=args.from_stage)
    return 0


def _sweep(sub: Any) -> None:
    p = _command(
        sub,
        "sweep",
        cmd_sweep,
        "train and evaluate over a grid ([sweep]): what N synthetic images are worth",
        "Run the pipeline once per point of the config's [sweep] grid -- synthetic images "
        "per class (images), what the CNN learns from (sources: synthetic, real, both) and "
        "any settings to vary (vary, dotted names) -- each point in its own data root under "
        "DATA/sweep/points/, the images generated once at the largest N and shared. Then "
        "write DATA/sweep/table.csv, accuracy.png (accuracy on each test set against N, the "
        "real-only baseline as a line) and summary.json, with 'one real image ≈ k synthetic' "
        "where the curves allow it. Points already evaluated are skipped: re-running resumes. "
        "On a cluster: --only-generate (with --shard I/N as an array), then --shard I/N (an "
        "array over the points), then once without options to write the table.",
    )
    p.add_argument("--shard", type=shard_spec, metavar="I/N",
                   help="run only every N-th point, from the I-th (a Slurm array task)")  # fmt: skip
    p.add_argument("--only-generate", action="store_true",
                   help="only generate the sweep's images (with --shard: part I of N)")  # fmt: skip
    _devices_option(p)
    p.add_argument("--prune", action="store_true",
                   help="remove the folders under DATA/sweep/ that no point of this grid uses "
                   "(images of settings no longer swept, old points; `status` lists their "
                   "size), and run nothing")  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> int:
    from synthflux.sweep import prune, run

    if args.prune:
        return _print(prune(Path(args.config), args.data))
    run(Path(args.config), data_root=args.data, shard=args.shard,
        only_generate=args.only_generate, devices=args.devices)  # fmt: skip
    return 0


def _submit(sub: Any) -> None:
    p = _command(
        sub,
        "submit",
        cmd_submit,
        "run the stages on a Slurm cluster as job arrays",
        "Submit every stage as a Slurm job, each after the one before succeeds: a sharded "
        "stage (generate, preprocess) as a job array of N tasks (task i runs `STAGE --shard "
        "i/N`), the others as one job. Batch scripts and logs go to DATA/slurm/. See "
        "docs/cluster.md.",
    )
    add = p.add_argument
    add("--shards", type=int, metavar="N", help="tasks per array (required, except with "
        "--resubmit-failed, which reuses the last submission's)")  # fmt: skip
    add("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    add("--gpus-per-task", type=int, metavar="G", help="GPUs for each task of the stages that "
        "use one (generate, train) (default none)")  # fmt: skip
    add("--cpus-per-task", type=int, metavar="C", help="CPUs for each task (default: Slurm's, 1)")
    add("--time", metavar="T", help="time limit per task, e.g. 2:00:00")
    add("--max-parallel", type=int, metavar="K", help="run at most K tasks of an array at once")
    add("--classify-backend", "--backend", dest="classify_backend", metavar="B",
        help="where the CNN runs on the nodes (train, classify, evaluate): auto, docker, local, "
        "reference, or apptainer (the Julia image as a .sif, see --sif) (default: "
        "cnn.backend)")  # fmt: skip
    add("--sif", metavar="IMAGE", help="Apptainer/Singularity image for the CNN's stages")
    add(
        "--python",
        metavar="PATH",
        help=f"python that runs synthflux on the nodes (default: this one, {sys.executable})",
    )
    add("--sbatch-option", action="append", metavar="OPT", help="extra sbatch option for every "
        "job, e.g. --sbatch-option=--account=abc (repeatable)")  # fmt: skip
    add("--dry-run", action="store_true", help="print the batch scripts; submit nothing")
    add("--resubmit-failed", action="store_true", help="resubmit only the shards whose outputs "
        "are incomplete (as `status` shows), and the stages after them, with the last "
        "submission's options")  # fmt: skip


SUBMIT_OPTIONS = ("shards", "partition", "gpus_per_task", "cpus_per_task", "time",
                  "max_parallel", "classify_backend", "sif", "python")  # fmt: skip


def cmd_submit(args: argparse.Namespace) -> int:
    from synthflux.slurm import submit_pipeline

    given = {name: getattr(args, name) for name in SUBMIT_OPTIONS}
    given["sbatch_options"] = tuple(args.sbatch_option) if args.sbatch_option else None
    return _print(
        submit_pipeline(
            _config(args), Path(args.config), given,
            resubmit=args.resubmit_failed, dry=args.dry_run,
        )
    )  # fmt: skip


def _status(sub: Any) -> None:
    p = _command(
        sub,
        "status",
        cmd_status,
        "per-stage, per-shard completion, read from the data",
        "Show which shards of each stage are complete, from the files in DATA "
        "(generate's part records, preprocess's shard markers, every stage's stage.json), not "
        "from the scheduler.",
    )
    p.add_argument("--shards", type=at_least(1), metavar="N",
                   help="group by N tasks (default: the last submission's, else 1)")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS,
                   help="where the CNN trains and runs, as `run --backend` would ask: its "
                   "results belong to it (default: the last submission's, else "
                   "cnn.backend)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_status(args: argparse.Namespace) -> int:
    from synthflux.backends import choose
    from synthflux.status import pipeline_status, status_backend, status_shards

    cfg = _config(args)
    asked = cfg.with_cnn(backend=status_backend(cfg, args.backend))
    cfg = choose(asked, quiet=True)  # (it runs nothing: the backend is one word of the header)
    auto = (
        f"; CNN results of backend {cfg.cnn.backend} (auto)" if asked.cnn.backend == "auto" else ""
    )
    status = pipeline_status(cfg, status_shards(cfg, args.shards))
    if args.json:
        return _print([json.dumps(status.to_json(), indent=2)])
    from synthflux.config import read_toml
    from synthflux.sweep import status_lines

    swept = "sweep" in read_toml(Path(args.config))  # its points are runs of their own
    sweep_lines = status_lines(Path(args.config), args.data) if swept else []
    return _print([f"data: {cfg.data_root}{auto}", *status.lines(), *sweep_lines])


def _tiny_model(sub: Any) -> None:
    p = _command(
        sub,
        "tiny-model",
        cmd_tiny_model,
        "save a tiny random Stable Diffusion pipeline (tests, demos)",
        "Build a tiny randomly initialised Stable Diffusion pipeline offline and "
        'save it with save_pretrained. `model = "tiny"` in a config does this automatically.',
        config=False,
    )
    p.add_argument("dir", help="folder to save the pipeline to")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from synthflux.tiny_model import save_tiny_model

    folder = save_tiny_model(Path(args.dir), seed=args.seed)
    return _print([f"tiny Stable Diffusion pipeline (random weights) saved to {folder}"])


def _digits(sub: Any) -> None:
    p = _command(
        sub,
        "digits",
        cmd_digits,
        "write scikit-learn's handwritten digits as ImageFolders DIR/train and DIR/test",
        "Write the 1,797 real 8x8 digits that scikit-learn ships (nothing is downloaded) as "
        "DIR/train/<digit>/*.png and DIR/test/<digit>/*.png, split at random by --seed: real "
        "images to import, fit the generator to and test on (`make demo` uses them).",
        config=False,
    )
    p.add_argument("dir", type=Path, help="folder to write train/ and test/ into")
    p.add_argument("--test-fraction", type=float, default=0.5, metavar="F",
                   help="share of the images that go to test/ (default 0.5: ~90 per class each)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")


def cmd_digits(args: argparse.Namespace) -> int:
    from synthflux.digits import write_digits

    train, test = write_digits(args.dir, test_fraction=args.test_fraction, seed=args.seed)
    counts = [sum(1 for _ in folder.glob("*/*.png")) for folder in (train, test)]
    return _print([f"digits: {counts[0]} images in {train}, {counts[1]} in {test}"])


def build_parser() -> argparse.ArgumentParser:
    from synthflux.pipeline import STAGES

    parser = _Parser(
        prog="synthflux",
        description="Turn a description of classes into a labelled synthetic image dataset "
        "(Stable Diffusion), preprocess it into .npz shards, train a Flux.jl CNN on it and "
        "measure it on real images. One TOML config drives every stage; see README.md.",
    )
    parser.add_argument("--version", action="version", version=f"synthflux {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for st in STAGES:
        _stage_command(sub, st)
    for add in (_import, _run, _sweep, _submit, _status, _tiny_model, _digits):
        add(sub)
    return parser


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (kill, docker stop, a scheduler's timeout) stops a run as Ctrl-C does: what is
    made is kept and the next run resumes."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:  # building the parser imports the stages: Ctrl-C may come while it does
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("synthflux: interrupted", file=sys.stderr)
        return 130
    if args.command is None:  # `synthflux` alone: what it can do, not an error
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="synthflux: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    func: Handler = args.func
    try:
        return func(args)
    except SynthfluxError as e:
        print(f"synthflux {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synthflux {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `synthflux status | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a full disk, no permission, a file where a folder should be, ...
        log.debug("synthflux %s: OS error", args.command, exc_info=True)
        what = f"{e.filename}: " if e.filename else ""
        print(f"synthflux {args.command}: error: {what}{e.strerror or e}", file=sys.stderr)
        return 2
