"""The `synthflux` command: a thin argparse layer over the stage functions.

Errors a user can fix (SynthfluxError) print as one line and exit 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from synthflux import __version__
from synthflux.config import BACKENDS, STAGES
from synthflux.errors import SynthfluxError

log = logging.getLogger("synthflux")

DATA_HELP = "data root (overrides data_root in the config); all stages read and write under it"


def _config(args: argparse.Namespace):
    from synthflux.config import load_config

    return load_config(args.config, data_root=args.data)


def _print_lines(lines: list[str]) -> int:
    """A stage's summary on stdout (logs and progress go to stderr)."""
    for line in lines:
        print(line)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from synthflux.generate import generate
    from synthflux.storage import ShardSpec

    shard = ShardSpec.parse(args.shard)
    if args.limit is not None and args.limit < 1:
        raise SynthfluxError(f"--limit must be a positive number of images, got {args.limit}")
    summary = generate(_config(args), shard=shard, limit=args.limit)
    return _print_lines(summary.lines())


def cmd_preprocess(args: argparse.Namespace) -> int:
    from synthflux.preprocess import preprocess
    from synthflux.storage import ShardSpec

    shard = ShardSpec.parse(args.shard)
    if args.workers is not None and args.workers < 1:
        raise SynthfluxError(f"--workers must be at least 1, got {args.workers}")
    summary = preprocess(_config(args), shard=shard, workers=args.workers)
    return _print_lines(summary.lines())


def cmd_classify(args: argparse.Namespace) -> int:
    from synthflux.classify import classify

    summary = classify(_config(args), backend=args.backend, image=args.image)
    return _print_lines(summary.lines())


def cmd_run(args: argparse.Namespace) -> int:
    from synthflux.pipeline import run_pipeline

    run_pipeline(_config(args), from_stage=args.from_stage, backend=args.backend, image=args.image)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from synthflux.report import build_report

    if args.per_class < 1:
        raise SynthfluxError(f"--per-class must be at least 1, got {args.per_class}")
    report = build_report(_config(args), per_class=args.per_class)
    print(f"report: {report.shown} of {report.total} images shown")
    print(f"  {report.html}")
    print(f"  {report.contact_sheet}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from synthflux.submit import submit_pipeline

    given = {
        "shards": args.shards,
        "partition": args.partition,
        "gpus_per_task": args.gpus_per_task,
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,
        "max_parallel": args.max_parallel,
        "classify_backend": args.classify_backend,
        "sif": args.sif,
        "python": args.python,
        "sbatch_options": tuple(args.sbatch_option) if args.sbatch_option else None,
    }
    lines = submit_pipeline(
        _config(args),
        Path(args.config),
        given,
        resubmit=args.resubmit_failed,
        dry=args.dry_run,
    )
    for line in lines:
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from synthflux.submit import pipeline_status, status_shards

    cfg = _config(args)
    status = pipeline_status(cfg, status_shards(cfg, args.shards))
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(f"data: {cfg.data_root}")
        for line in status.lines():
            print(line)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from synthflux.tiny_model import save_tiny_model

    folder = save_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny Stable Diffusion pipeline (random weights) saved to {folder}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config (TOML), e.g. examples/tiny.toml")
    p.add_argument("--data", metavar="DIR", help=DATA_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthflux",
        description=(
            "Turn a description of classes into a labelled synthetic image dataset "
            "(Stable Diffusion), preprocess it into .npz shards, and classify it with a "
            "Flux.jl CNN. One TOML config drives every stage; see README.md."
        ),
    )
    parser.add_argument("--version", action="version", version=f"synthflux {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        help="stage 1: prompts -> PNG images + manifest",
        description=(
            "Generate every class's images with the configured diffusion model into "
            "DATA/generated/<class>/ and write DATA/generated/manifest.jsonl. Re-running "
            "skips images already present and verified, so an interrupted run resumes."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="make only part I of N (images whose id %% N == I); the N parts together "
        "equal an unsharded run, byte for byte on CPU (default: 0/1, everything)",
    )
    p.add_argument(
        "--limit", type=int, metavar="K", help="make at most K new images in this run, then stop"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "preprocess",
        help="stage 2: PNGs -> normalised .npz shards",
        description=(
            "Decode, orient, convert (grayscale or RGB), resize and normalise the generated "
            "images into DATA/preprocessed/shard-NNNNN.npz (float32, Flux's WHCN layout), "
            "with dataset.json, a manifest and rejects.jsonl for images that cannot be used. "
            "Verified shards are skipped, so an interrupted run resumes."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="write only output shards k with k %% N == I (default: 0/1, all of them)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="K",
        help="decoding processes (default: preprocess.workers, 0 there = one per CPU core)",
    )
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser(
        "classify",
        help="stage 3: .npz shards -> class probabilities (Flux.jl CNN) + report",
        description=(
            "Run the Flux.jl CNN (julia/flux_model.jl) once over every shard in "
            "DATA/preprocessed/ -- in one locked-down container by default (no network, no "
            "capabilities, non-root, read-only inputs), or with a local julia -- check every "
            "DATA/predictions/shard-NNNNN.probs.npz it writes, then write predictions.csv and "
            "summary.json (accuracy against the prompt labels, confusion matrix). Without "
            "classify.weights, DATA/model/weights.npz is used, made from the seed if missing."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="docker: run the image with the Docker engine (DOCKER_HOST); local: run "
        "`julia --project=julia julia/flux_model.jl` here; reference: the same network in "
        "PyTorch, in-process (no Julia needed); none: only collect and check the outputs "
        "another process wrote (default: classify.backend, docker)",
    )
    p.add_argument(
        "--image",
        metavar="TAG",
        help="Docker image holding flux_model.jl (default: classify.image, "
        "synthflux-julia:latest; build it with `make images`)",
    )
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser(
        "run",
        help="all stages: generate -> preprocess -> classify",
        description=(
            "Run generate, preprocess and classify in order. Each stage keeps what is already "
            "complete and verified, so `run` after an interruption resumes; --from STAGE "
            "deletes that stage's outputs (and later ones) and redoes them."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGES,
        help="redo from this stage: its outputs and later stages' are deleted first",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="classifier backend (default: classify.backend in the config)",
    )
    p.add_argument("--image", metavar="TAG", help="Julia image for the docker backend")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "report",
        help="HTML page + contact sheet of a classified run",
        description=(
            "Write DATA/report/index.html (self-contained) and DATA/report/contact-sheet.png: "
            "thumbnails grouped by class with prompt, seed and predicted probabilities, and "
            "the confusion matrix."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--per-class", type=int, default=24, metavar="N", help="thumbnails per class (default 24)"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "submit",
        help="run the stages on a Slurm cluster as job arrays",
        description=(
            "Submit generate as a Slurm job array of N tasks (task i runs `generate --shard "
            "i/N`), preprocess as an array that starts when all of them succeed, and one "
            "classify job after that. Batch scripts and logs go to DATA/slurm/. "
            "See docs/cluster.md."
        ),
    )
    _add_common(p)
    p.add_argument("--shards", type=int, metavar="N", help="tasks per array (required, "
                   "except with --resubmit-failed, which reuses the last submission's)")  # fmt: skip
    p.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    p.add_argument(
        "--gpus-per-task", type=int, metavar="G", help="GPUs for each generate task (default none)"
    )
    p.add_argument(
        "--cpus-per-task", type=int, metavar="C", help="CPUs for each task (default: Slurm's, 1)"
    )
    p.add_argument("--time", metavar="T", help="time limit per task, e.g. 2:00:00")
    p.add_argument(
        "--max-parallel", type=int, metavar="K", help="run at most K tasks of an array at once"
    )
    p.add_argument(
        "--classify-backend",
        metavar="B",
        help="classify backend on the node: docker, local, reference, or apptainer (the "
        "Julia image as a .sif, see --sif) (default: classify.backend)",
    )
    p.add_argument("--sif", metavar="IMAGE", help="Apptainer/Singularity image for classify")
    p.add_argument(
        "--python",
        metavar="PATH",
        help=f"python that runs synthflux on the nodes (default: this one, {sys.executable})",
    )
    p.add_argument(
        "--sbatch-option",
        action="append",
        metavar="OPT",
        help="extra sbatch option for every job, e.g. --sbatch-option=--account=abc (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the batch scripts; submit nothing")
    p.add_argument(
        "--resubmit-failed",
        action="store_true",
        help="resubmit only the shards whose outputs are incomplete (as `status` shows), "
        "and the stages after them, with the last submission's options",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "status",
        help="per-stage, per-shard completion, read from the data",
        description=(
            "Show which shards of each stage are complete, from the files in DATA (generate's "
            "part records, preprocess's shard markers, classify's stage.json), not from the "
            "scheduler."
        ),
    )
    _add_common(p)
    p.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="group by N tasks (default: the last submission's, else 1)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "tiny-model",
        help="save a tiny random Stable Diffusion pipeline (tests, demos)",
        description=(
            "Build a tiny randomly initialised Stable Diffusion pipeline offline and save it "
            'with save_pretrained. `model = "tiny"` in a config does this automatically.'
        ),
    )
    p.add_argument("dir", help="folder to save the pipeline to")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="synthflux: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    func: Callable[[argparse.Namespace], int] = args.func
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
