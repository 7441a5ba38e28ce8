"""train: the CNN learns the training sources, with Flux.jl (or its PyTorch twin).

The trainer (julia/flux_model.jl train, or synthflux.reference_train) runs once over the
training sources' shards from initial weights made here from `[train] seed`, and writes only
DATA/training/run/: a checkpoint every epoch (so a killed run resumes), metrics.jsonl, and
weights.npz (the best epoch's). Its `metrics:` lines are streamed into a progress bar or log
lines. When it is done its files are checked and the weights become DATA/model/weights.npz,
which classify uses; stage.json, last, says from what they were trained. docs/training.md has
the rules, the same in both languages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthflux import lineage
from synthflux.backends import Job, backend_for, choose
from synthflux.backends.supervise import interrupts
from synthflux.config import PipelineConfig
from synthflux.contracts import load_dataset, read_dataset
from synthflux.errors import DataError, TrainError
from synthflux.layout import DataLayout
from synthflux.progress import Progress
from synthflux.sources import Source, training_sources
from synthflux.stages import Stage, read_stage_marker
from synthflux.storage import atomic_write, exclusive, write_json_atomic
from synthflux.trainplan import TrainSettings
from synthflux.weights import (
    Weights,
    check_weights,
    checkpoint_problem,
    init_weights,
    load_weights,
    save_weights,
)

log = logging.getLogger("synthflux")

OUTPUTS = ("checkpoint.npz", "metrics.jsonl", "weights.npz")


@dataclass
class TrainSummary:
    backend: str
    sources: list[str]
    epochs: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    seconds: float = 0.0
    complete: bool = True
    note: str = ""

    @property
    def best(self) -> dict[str, Any] | None:
        """The epoch whose weights were kept: the lowest val loss (the first, on ties), or the
        last without validation images (docs/training.md)."""
        scored = [e for e in self.epochs if e.get("val_loss") is not None]
        if not scored:
            return self.epochs[-1] if self.epochs else None
        return min(scored, key=lambda e: (e["val_loss"], e["epoch"]))

    def lines(self) -> list[str]:
        if not self.complete:
            return [self.note]
        out = [f"trained on {', '.join(self.sources)} for {len(self.epochs)} epochs with "
               f"{BACKEND_NAMES[self.backend]} in {self.seconds:.1f}s"]  # fmt: skip
        if (best := self.best) is not None:
            out.append(f"best epoch {best['epoch']}: {epoch_line(best)}")
        out.append("wrote model/weights.npz (the best epoch's) and training/run/metrics.jsonl")
        return out


BACKEND_NAMES = {"docker": "Flux.jl in docker", "local": "Flux.jl (local julia)",
                 "reference": "the PyTorch reference", "none": "a trainer run elsewhere"}  # fmt: skip


def epoch_line(m: dict[str, Any]) -> str:
    val = (
        f"val loss {m['val_loss']:.4f} (accuracy {m['val_accuracy']:.3f})"
        if m.get("val_loss") is not None
        else "no validation images"
    )
    return (f"train loss {m['train_loss']:.4f} (accuracy {m['train_accuracy']:.3f}), {val}, "
            f"{m['images_per_s']:.0f} img/s")  # fmt: skip


def run(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> TrainSummary:
    """Train (or resume, or collect a finished run) and publish DATA/model/weights.npz."""
    started = time.monotonic()
    cfg = choose(cfg.with_cnn(backend=backend, image=image))
    layout = cfg.layout
    # 1. the training sources' finished datasets, and what the result will depend on
    sources = training_sources(cfg)  # first: a source asked for and never imported
    lineage.require(cfg, "preprocess")
    shape = _shape(cfg, sources)
    key = inputs_key(cfg, sources)
    layout.training.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.train_lock, "train"):
        # 2. a run folder that belongs to this key (a stale checkpoint is removed), the initial
        # weights, and the trainer's arguments (also written for a trainer run elsewhere)
        job = _prepare(cfg, layout, sources, shape, key)
        summary = TrainSummary(cfg.cnn.backend, [s.name for s in sources])
        if cfg.cnn.backend == "none" and not all((job.output / f).is_file() for f in OUTPUTS):
            summary.complete = False
            summary.note = (f"prepared {layout.job_args}: run `julia julia/flux_model.jl "
                            f"@{layout.job_args}` (compose: the train service), then this again")  # fmt: skip
            return summary
        # 3. the trainer, streamed; 4. its files checked, the weights published, stage.json last
        with interrupts(), Progress("train", cfg.train.epochs, unit="epoch") as progress:
            job = _with_listener(job, progress)
            backend_for(cfg).train(job)
        weights, summary.epochs = _check_outputs(job.output, shape)
        save_weights(layout.default_weights, weights)
        summary.seconds = time.monotonic() - started
        outputs = [layout.trainer_output(f) for f in OUTPUTS] + [layout.default_weights]
        lineage.record(cfg, "train", key=key, seconds=summary.seconds, outputs=outputs,
                       facts={"backend": summary.backend, "sources": summary.sources,
                              "epochs": len(summary.epochs)})  # fmt: skip
    return summary


def _shape(cfg: PipelineConfig, sources: list[Source]) -> tuple[int, int, int, int]:
    """(W, H, C, K) of the training data; every source must agree."""
    shapes = set()
    for s in sources:
        ds = load_dataset(cfg, s.name)
        shapes.add((ds.width, ds.height, ds.channels, len(ds.classes)))
    if len(shapes) != 1:
        raise DataError(f"the training sources' images differ in shape: {sorted(shapes)}")
    return shapes.pop()


def inputs_key(cfg: PipelineConfig, sources: list[Source]) -> str:
    """What the trained weights depend on: every training shard's bytes, the settings (the
    initial weights follow from them) and where the training runs."""
    layout = cfg.layout
    shards = {s.name: [[e["file"], e["sha256"]] for e in read_dataset(
        layout.prepared(s.name))["shards"]] for s in sources}  # fmt: skip
    c = choose(cfg).cnn
    inputs = {"shards": shards, "train": cfg.train.model_dump(exclude={"timeout_s"}),
              "backend": c.backend, "image": c.image if c.backend == "docker" else None}  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _prepare(
    cfg: PipelineConfig,
    layout: DataLayout,
    sources: list[Source],
    shape: tuple[int, int, int, int],
    key: str,
) -> Job:
    run_dir, marker = layout.training_run, layout.training_key
    if (read_stage_marker(marker) or {}).get(
        "key"
    ) != key:  # another dataset or settings: the checkpoint is not this training's
        shutil.rmtree(run_dir, ignore_errors=True)
        t = cfg.train
        save_weights(layout.init_weights, init_weights(
            *shape, seed=t.seed, channels_per_block=tuple(t.blocks), kernel=t.kernel))  # fmt: skip
        write_json_atomic(marker, {"key": key})
    run_dir.mkdir(parents=True, exist_ok=True)
    _set_aside_if_damaged(layout.trainer_output("checkpoint.npz"))
    inputs = tuple((s.name, layout.prepared(s.name).folder) for s in sources)
    job = Job("train", inputs, (), layout.init_weights, run_dir, layout.relative(run_dir),
              (), OUTPUTS, cfg.train.timeout_s, "train.timeout_s",
              settings=TrainSettings.of(cfg.train))  # fmt: skip
    with atomic_write(layout.job_args, "w") as f:  # for `flux_model.jl @job.args`
        inside = DataLayout(Path("/data"))
        args = job.args([str(inside.prepared(s.name).folder) for s in sources],
                        str(inside.init_weights), str(inside.training_run))  # fmt: skip
        f.write("\n".join(args) + "\n")
    return job


def _set_aside_if_damaged(checkpoint: Path) -> None:
    """A checkpoint that cannot be resumed from (a disk that filled, a copy cut short) is kept
    beside as .damaged, said in one line, and the training starts afresh."""
    if checkpoint.is_file() and (why := checkpoint_problem(checkpoint)) is not None:
        aside = checkpoint.with_name(checkpoint.name + ".damaged")
        os.replace(checkpoint, aside)
        log.warning("train: %s is damaged (%s): kept as %s; training starts afresh", checkpoint, why,
                    aside.name)  # fmt: skip


def _with_listener(job: Job, progress: Progress) -> Job:
    """The job, with its `metrics:` lines as progress and log lines (`progress:` ones dropped)."""
    from dataclasses import replace

    def listen(line: str) -> bool:
        if line.startswith("progress: "):
            return True
        if line.startswith("metrics: "):
            try:
                m = json.loads(line.removeprefix("metrics: "))
                log.info("train: epoch %d: %s", m["epoch"], epoch_line(m))
            except (ValueError, KeyError, TypeError):
                return False
            progress.update()
            return True
        return False

    return replace(job, listener=listen)


def _check_outputs(
    output: Path, shape: tuple[int, int, int, int]
) -> tuple[Weights, list[dict[str, Any]]]:
    """The trainer's weights (a valid set for this data) and its metrics, which must parse."""
    path = output / "weights.npz"
    if not path.is_file():
        raise TrainError(f"the trainer wrote no {path}")
    weights = load_weights(path)
    spec = check_weights(weights, str(path))
    if (spec.width, spec.height, spec.channels, spec.n_classes) != shape:
        raise TrainError(f"{path}: trained for another shape than the data's {shape}")
    try:
        lines = (output / "metrics.jsonl").read_text().splitlines()
        epochs = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as e:
        raise TrainError(f"{output / 'metrics.jsonl'}: unreadable ({e})") from None
    for m in epochs:
        if not isinstance(m, dict) or not isinstance(m.get("epoch"), int):
            raise TrainError(f"{output / 'metrics.jsonl'}: a line without an epoch: {m}")
        if not math.isfinite(float(m.get("train_loss") or 0.0)):
            raise TrainError(
                f"training diverged: train loss {m.get('train_loss')} in epoch {m['epoch']}"
            )
    return weights, epochs


def key(cfg: PipelineConfig) -> str:
    """The stage's key (synthflux.lineage): inputs_key over this config's training sources."""
    return inputs_key(cfg, training_sources(cfg))


STAGE = Stage(
    "train", run, key=key, folder=lambda layout: layout.training,
    results=lambda cfg: [cfg.layout.default_weights], needs=("preprocess",), runs_cnn=True,
    uses_gpu=True, unit="models", product="trained weights",
    help="train the CNN (Flux.jl, or its PyTorch twin) on the training sources",
    description="Train the CNN with Flux.jl (julia/flux_model.jl train; or its PyTorch twin "
    "with --backend reference) on the sources [train] names, from initial weights made from "
    "train.seed. Every epoch's metrics are shown and kept in DATA/training/run/metrics.jsonl, "
    "with a checkpoint, so a killed run resumes. The best validation epoch's weights become "
    "DATA/model/weights.npz, which classify and evaluate use. docs/training.md has the rules.",
)  # fmt: skip
