"""The `synthflux` command: a thin argparse layer over the stage functions.

One small builder per command, next to its handler (the module is long only because every
command's --help explains itself). Errors a user can fix (SynthfluxError, bad arguments, OS
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
from synthflux.errors import ConfigError, SynthfluxError
from synthflux.storage import ShardSpec

# The stages are imported when the parser is built, inside main's handling of Ctrl-C.

log = logging.getLogger("synthflux")

DATA_HELP = "data root (overrides data_root in the config); all stages read and write under it"
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --- argument types: validation happens while parsing -----------------------------------------


def shard_spec(text: str) -> ShardSpec:
    try:
        return ShardSpec.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard ")) from None


def at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


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


def _shard_option(p: argparse.ArgumentParser, meaning: str) -> None:
    p.add_argument(
        "--shard", type=shard_spec, default=ShardSpec(), metavar="I/N",
        help=f"{meaning} (default: 0/1, everything)",
    )  # fmt: skip


def _backend_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--backend", choices=BACKENDS, help=help)
    p.add_argument(
        "--image", metavar="TAG",
        help="Docker image holding flux_model.jl (default: classify.image, "
        "synthflux-julia:latest; build it with `make images`)",
    )  # fmt: skip


def _config(args: argparse.Namespace) -> PipelineConfig:
    from synthflux.config import load_config

    return load_config(args.config, data_root=args.data)


def _print(lines: list[str]) -> int:
    """A command's summary on stdout (logs and progress go to stderr)."""
    for line in lines:
        print(line)
    return 0


# --- the commands ---------------------------------------------------------------------------


def _generate(sub: Any) -> None:
    p = _command(
        sub,
        "generate",
        cmd_generate,
        "stage 1: prompts -> PNG images + manifest (the synthetic source)",
        "Generate every class's images with the configured diffusion model into "
        "DATA/generated/<class>/ and write DATA/generated/manifest.jsonl. Re-running skips "
        "images already present and verified, so an interrupted run resumes.",
    )
    _shard_option(p, "make only part I of N (images whose id %% N == I); the N parts together "
                     "equal an unsharded run, byte for byte on CPU")  # fmt: skip
    p.add_argument("--limit", type=at_least(1), metavar="K",
                   help="make at most K new images in this run, then stop")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from synthflux import generate

    return _print(generate.run(_config(args), shard=args.shard, limit=args.limit).lines())


def _preprocess(sub: Any) -> None:
    p = _command(
        sub,
        "preprocess",
        cmd_preprocess,
        "stage 3: every source's images -> normalised .npz shards",
        "Decode, orient, convert (grayscale or RGB), resize and normalise the "
        "generated images into DATA/preprocessed/shard-NNNNN.npz (float32, Flux's WHCN layout), "
        "with dataset.json, a manifest and rejects.jsonl for images that cannot be used. "
        "Verified shards are skipped, so an interrupted run resumes.",
    )
    _shard_option(p, "write only output shards k with k %% N == I")
    p.add_argument("--workers", type=at_least(1), metavar="K",
                   help="decoding processes (default: preprocess.workers, 0 there = one per "
                   "CPU core)")  # fmt: skip


def cmd_preprocess(args: argparse.Namespace) -> int:
    from synthflux import preprocess

    return _print(preprocess.run(_config(args), shard=args.shard, workers=args.workers).lines())


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


def _train(sub: Any) -> None:
    p = _command(
        sub,
        "train",
        cmd_train,
        "stage 4: train the Flux.jl CNN on the training sources",
        "Train the CNN with Flux.jl (julia/flux_model.jl train; or its PyTorch twin with "
        "--backend reference) on the sources [train] names, from initial weights made from "
        "train.seed. Every epoch's metrics are shown and kept in DATA/training/run/"
        "metrics.jsonl, with a checkpoint, so a killed run resumes. The best validation "
        "epoch's weights become DATA/model/weights.npz, which classify and evaluate use. "
        "docs/training.md has the rules.",
    )
    _backend_option(p, "where the CNN trains: docker, local, reference, or none (collect what "
                       "another process trained) (default: classify.backend)")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from synthflux import train

    summary = train.run(_config(args), backend=args.backend, image=args.image)
    return _print([f"train: {line}" for line in summary.lines()])


def _evaluate(sub: Any) -> None:
    p = _command(
        sub,
        "evaluate",
        cmd_evaluate,
        "stage 6: accuracy, precision, recall and F1 on the validation split and test sets",
        "Score the trained CNN on the validation split of its training sources and on every "
        "imported test set (classifying first if the predictions are not current): "
        "DATA/evaluation/summary.json (accuracy, per-class precision/recall/F1, confusion "
        "matrix, counts per split) and DATA/evaluation/predictions.csv.",
    )
    _backend_option(p, "where the CNN runs if it must classify first (default: classify.backend)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from synthflux import evaluate

    summary = evaluate.run(_config(args), backend=args.backend, image=args.image)
    return _print([f"evaluate: {line}" for line in summary.lines()])


def _classify(sub: Any) -> None:
    p = _command(
        sub,
        "classify",
        cmd_classify,
        "stage 5: .npz shards -> class probabilities (Flux.jl CNN)",
        "Run the trained Flux.jl CNN (julia/flux_model.jl) over every source's shards in "
        "DATA/preprocessed/<source>/ -- in one locked-down container per source by default "
        "(no network, no capabilities, non-root, read-only inputs), or with a local julia "
        "-- check every DATA/predictions/<source>/shard-NNNNN.probs.npz it writes, then "
        "write predictions.csv and summary.json (accuracy against the labels, confusion "
        "matrix, per source). The weights are DATA/model/weights.npz (from `synthflux "
        "train`) unless classify.weights names others.",
    )
    _backend_option(
        p,
        "docker: run the image with the Docker engine (DOCKER_HOST); local: run "
        "`julia --project=julia julia/flux_model.jl` here; reference: the same network in "
        "PyTorch, in-process (no Julia needed); none: only collect and check the outputs "
        "another process wrote (default: classify.backend, docker)",
    )


def cmd_classify(args: argparse.Namespace) -> int:
    from synthflux import classify

    return _print(classify.run(_config(args), backend=args.backend, image=args.image).lines())


def _run(sub: Any) -> None:
    from synthflux.pipeline import STAGE_NAMES

    p = _command(
        sub,
        "run",
        cmd_run,
        "all stages: generate -> preprocess -> train -> classify -> evaluate -> report",
        "Run the stages in order (generate only where train.sources has synthetic). Each stage "
        "keeps what is already complete and verified, so `run` after an interruption resumes; "
        "--from STAGE deletes that stage's outputs (and later ones) and redoes them.",
    )
    p.add_argument("--from", dest="from_stage", choices=STAGE_NAMES,
                   help="redo from this stage: its outputs and later stages' are deleted first")  # fmt: skip
    _backend_option(p, "where the CNN trains and runs (default: classify.backend in the config)")


def cmd_run(args: argparse.Namespace) -> int:
    from synthflux.classify import with_overrides
    from synthflux.pipeline import run_pipeline

    # Where the CNN runs belongs to its results: each stage is asked whether it is complete
    # for this backend, as `status --backend` asks.
    cfg = with_overrides(_config(args), backend=args.backend, image=args.image)
    run_pipeline(cfg, from_stage=args.from_stage)
    return 0


def _report(sub: Any) -> None:
    p = _command(
        sub,
        "report",
        cmd_report,
        "HTML page + contact sheet of a classified run",
        "Write DATA/report/index.html (self-contained) and "
        "DATA/report/contact-sheet.png: thumbnails grouped by class with prompt, seed and "
        "predicted probabilities, and the confusion matrix.",
    )
    p.add_argument("--per-class", type=at_least(1), default=24, metavar="N",
                   help="thumbnails per class (default 24)")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where index.html and contact-sheet.png go (default DATA/report; "
                   "elsewhere for a read-only data root)")  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    from synthflux import report

    summary = report.run(_config(args), per_class=args.per_class, out=args.out)
    return _print([f"report: {summary.lines()[0]}", *summary.lines()[1:]])


def _submit(sub: Any) -> None:
    p = _command(
        sub,
        "submit",
        cmd_submit,
        "run the stages on a Slurm cluster as job arrays",
        "Submit generate as a Slurm job array of N tasks (task i runs `generate "
        "--shard i/N`), preprocess as an array that starts when all of them succeed, and one "
        "classify job after that. Batch scripts and logs go to DATA/slurm/. "
        "See docs/cluster.md.",
    )
    add = p.add_argument
    add("--shards", type=int, metavar="N", help="tasks per array (required, except with "
        "--resubmit-failed, which reuses the last submission's)")  # fmt: skip
    add("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    add("--gpus-per-task", type=int, metavar="G", help="GPUs for each generate task (default none)")
    add("--cpus-per-task", type=int, metavar="C", help="CPUs for each task (default: Slurm's, 1)")
    add("--time", metavar="T", help="time limit per task, e.g. 2:00:00")
    add("--max-parallel", type=int, metavar="K", help="run at most K tasks of an array at once")
    add("--classify-backend", metavar="B", help="classify backend on the node: docker, local, "
        "reference, or apptainer (the Julia image as a .sif, see --sif) (default: "
        "classify.backend)")  # fmt: skip
    add("--sif", metavar="IMAGE", help="Apptainer/Singularity image for classify")
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
        "(generate's part records, preprocess's shard markers, classify's stage.json), not "
        "from the scheduler.",
    )
    p.add_argument("--shards", type=at_least(1), metavar="N",
                   help="group by N tasks (default: the last submission's, else 1)")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS,
                   help="where the CNN trains and runs, as `run --backend` would ask: its "
                   "results belong to it (default: the last submission's, else "
                   "classify.backend)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_status(args: argparse.Namespace) -> int:
    from synthflux.classify import with_overrides
    from synthflux.status import pipeline_status, status_backend, status_shards

    cfg = _config(args)
    cfg = with_overrides(cfg, backend=status_backend(cfg, args.backend))
    status = pipeline_status(cfg, status_shards(cfg, args.shards))
    if args.json:
        return _print([json.dumps(status.to_json(), indent=2)])
    return _print([f"data: {cfg.data_root}", *status.lines()])


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


COMMANDS = (_generate, _import, _preprocess, _train, _classify, _evaluate, _run, _report,
            _submit, _status, _tiny_model)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="synthflux",
        description="Turn a description of classes into a labelled synthetic image dataset "
        "(Stable Diffusion), preprocess it into .npz shards, and classify it with a Flux.jl "
        "CNN. One TOML config drives every stage; see README.md.",
    )
    parser.add_argument("--version", action="version", version=f"synthflux {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)  # fmt: skip
    for add in COMMANDS:
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
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("synthflux: interrupted", file=sys.stderr)
        return 130
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
