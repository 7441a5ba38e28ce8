"""Stage 3, classify: the Flux CNN over every shard, its probabilities checked, joined with the
generation manifest and summarised.

One classifier run covers all shards (one container, one `julia`, or the in-process PyTorch
twin: synthflux.backends). It writes into a private staging folder; every expected
`shard-NNNNN.probs.npz` is read back and checked before anything is published, then moved
into DATA/predictions/, followed by predictions.csv, summary.json and, last, stage.json (the
done marker). docs/classify.md has the design.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from synthflux.backends import BACKENDS, Job
from synthflux.backends.supervise import interrupts
from synthflux.config import PipelineConfig
from synthflux.contracts import Dataset, check_probs, load_dataset, read_dataset
from synthflux.errors import ClassifyError, DataError
from synthflux.layout import DataLayout
from synthflux.metrics import summarize
from synthflux.records import ManifestRecord, read_manifest
from synthflux.stages import ShardState, Stage, StageState
from synthflux.storage import atomic_write, write_json_atomic
from synthflux.weights import init_weights, load_weights, save_weights, spec_of

log = logging.getLogger("synthflux")

BACKEND_NAMES = {
    "docker": "docker image {image}",
    "local": "local julia",
    "reference": "the PyTorch reference",
    "none": "outputs already in place",
}


@dataclass
class ClassifySummary:
    backend: str
    image: str | None
    classes: list[str]
    images: int
    shards: int
    correct: int
    confusion: list[list[int]]
    classifier_seconds: float
    seconds: float
    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    def lines(self) -> list[str]:
        where = BACKEND_NAMES[self.backend].format(image=self.image)
        rate = self.images / max(self.classifier_seconds, 1e-9)
        width = max(len(c) for c in self.classes)
        out = [
            f"classified {self.images} images in {self.shards} shards with {where} in "
            f"{self.classifier_seconds:.1f}s ({rate:.1f} img/s)",
            f"accuracy against the prompt labels: {self.accuracy:.3f} ({self.correct}/{self.images})",
            "confusion matrix (rows: prompt class, columns: predicted class):",
            " " * (width + 2) + " ".join(f"{c:>{max(len(c), 5)}}" for c in self.classes),
        ]
        for name, row in zip(self.classes, self.confusion, strict=True):
            cells = " ".join(
                f"{v:>{max(len(c), 5)}}" for c, v in zip(self.classes, row, strict=True)
            )
            out.append(f"  {name:<{width}} {cells}")
        out.append(f"wrote {self.out_dir / 'predictions.csv'} and summary.json")
        return out


def run(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> ClassifySummary:
    """Run the classifier over every shard, check its outputs, write the predictions and report."""
    started = time.monotonic()
    cfg = with_overrides(cfg, backend=backend, image=image)
    backend = cfg.classify.backend
    layout = DataLayout(cfg.data_root)
    # 1. inputs: the shards, their generation records, the weights
    ds = load_dataset(cfg)
    inputs = _inputs(layout)
    records = _join_manifest(layout, ds)
    weights = ensure_weights(cfg, ds)
    out = layout.predictions
    out.mkdir(parents=True, exist_ok=True)
    layout.stage_marker("classify").unlink(missing_ok=True)  # not done until this run says so
    # 2. the classifier, writing only into a private staging folder
    job_shards = tuple(s.file for s in ds.shards)
    with _staging(out) as staging, interrupts():
        job = Job(layout.preprocessed, job_shards, weights, staging, cfg.classify.batch_size)
        run_start = time.monotonic()
        BACKENDS[backend](cfg, job)
        classifier_seconds = time.monotonic() - run_start
        # 3. every output checked before any is published
        k = len(ds.classes)
        probs = {s.file: check_probs(staging / s.probs_file, s, k) for s in ds.shards}
        _publish(staging, out, ds)
    # 4. predictions.csv, summary.json, then stage.json (the done marker)
    _write_predictions(layout.predictions_csv, ds, records, probs)
    summary = _summarise(cfg, ds, probs, weights, classifier_seconds, time.monotonic() - started)
    write_json_atomic(
        layout.stage_marker("classify"),
        {
            "stage": "classify",
            "seconds": summary.seconds,
            "classifier_seconds": classifier_seconds,
            "images": summary.images,
            "shards": summary.shards,
            "accuracy": summary.accuracy,
            "backend": backend,
            "image": summary.image,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": inputs,
        },
    )
    return summary


def with_overrides(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> PipelineConfig:
    """The config with the command line's --backend / --image applied."""
    update = {k: v for k, v in (("backend", backend), ("image", image)) if v is not None}
    if not update:
        return cfg
    if "backend" in update and update["backend"] not in BACKENDS:
        raise ClassifyError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    return cfg.model_copy(update={"classify": cfg.classify.model_copy(update=update)})


# --- inputs --------------------------------------------------------------------------------


def _join_manifest(layout: DataLayout, ds: Dataset) -> dict[int, ManifestRecord]:
    """The generation record of every shard image; labels must agree with the shards'."""
    by_id = {int(r["id"]): r for r in read_manifest(layout)}
    for shard in ds.shards:
        for image_id, label in zip(shard.ids.tolist(), shard.labels.tolist(), strict=True):
            rec = by_id.get(image_id)
            if rec is None:
                raise DataError(
                    f"{shard.path}: image id {image_id} is not in {layout.manifest}: re-run "
                    "preprocess"
                )
            if rec.get("label") != label:
                raise DataError(
                    f"{shard.path}: image id {image_id} has label {label}, the manifest says "
                    f"{rec.get('label')}: re-run preprocess"
                )
    return by_id


def weights_path(cfg: PipelineConfig) -> Path:
    return (
        Path(cfg.classify.weights)
        if cfg.classify.weights
        else DataLayout(cfg.data_root).default_weights
    )


def ensure_weights(cfg: PipelineConfig, ds: Dataset) -> Path:
    """The weights file; the default one is created from `seed` when it does not exist yet."""
    path = weights_path(cfg)
    if not path.is_file():
        if cfg.classify.weights:
            raise ClassifyError(f"classify.weights = {cfg.classify.weights!r}: no such file")
        weights = init_weights(ds.width, ds.height, ds.channels, len(ds.classes), seed=cfg.seed)
        save_weights(path, weights)
        log.info("classify: no weights yet, initialised random ones (seed %d): %s", cfg.seed, path)
    spec = spec_of(load_weights(path))
    want = (ds.width, ds.height, ds.channels, len(ds.classes))
    have = (spec.width, spec.height, spec.channels, spec.n_classes)
    if have != want:
        raise ClassifyError(
            f"{path} is for {have[0]}x{have[1]}x{have[2]} images and {have[3]} classes, the "
            f"dataset has {want[0]}x{want[1]}x{want[2]} and {want[3]}: point classify.weights "
            "at matching weights (or delete the default file to start from random ones)"
        )
    return path


def _inputs(layout: DataLayout) -> list[list[str]]:
    """The shards (file, sha256) as dataset.json lists them: what the predictions belong to."""
    return [[str(s["file"]), str(s["sha256"])] for s in read_dataset(layout)["shards"]]


# --- staging and publishing ---------------------------------------------------------------


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh private folder for this run's raw outputs, removed afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{DataLayout.STAGING_PREFIX}*"):  # left by a driver killed outright
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=DataLayout.STAGING_PREFIX))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path, ds: Dataset) -> None:
    owner = out.stat()
    for shard in ds.shards:
        dest = out / shard.probs_file
        os.replace(staging / shard.probs_file, dest)
        if os.geteuid() == 0 and dest.stat().st_uid != owner.st_uid:
            os.chown(dest, owner.st_uid, owner.st_gid)  # written by nobody in the container


# --- predictions.csv and summary.json ---------------------------------------------------------


def _write_predictions(
    path: Path, ds: Dataset, records: dict[int, ManifestRecord], probs: dict[str, np.ndarray]
) -> None:
    header = ["id", "name", "class", "label", "prompt", "seed", "file"]
    header += [f"p_{c}" for c in ds.classes] + ["predicted"]
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for shard in ds.shards:
            p = probs[shard.file]
            for row, image_id in enumerate(shard.ids.tolist()):
                rec = records[image_id]
                writer.writerow(
                    [image_id, rec.get("name", ""), ds.classes[int(shard.labels[row])],
                     int(shard.labels[row]), rec.get("prompt", ""), rec.get("seed", ""),
                     rec.get("file", ""), *(f"{v:.6f}" for v in p[row].tolist()),
                     ds.classes[int(p[row].argmax())]]
                )  # fmt: skip


def _summarise(
    cfg: PipelineConfig,
    ds: Dataset,
    probs: dict[str, np.ndarray],
    weights: Path,
    classifier_seconds: float,
    seconds: float,
) -> ClassifySummary:
    """Accuracy, confusion matrix and mean probabilities into summary.json; the summary."""
    layout = DataLayout(cfg.data_root)
    labels = np.concatenate([s.labels for s in ds.shards])
    all_probs = np.concatenate([probs[s.file] for s in ds.shards])
    scores = summarize(labels, all_probs, ds.classes, rows="prompt class")
    timings: dict[str, Any] = {}
    for stage in ("generate", "preprocess"):
        if (timing := _stage_timing(layout.stage_marker(stage))) is not None:
            timings[stage] = timing
    timings["classify"] = {
        "stage": "classify",
        "seconds": seconds,
        "classifier_seconds": classifier_seconds,
    }
    backend = cfg.classify.backend
    image = cfg.classify.image if backend == "docker" else None
    extra = {"backend": backend, "image": image, "weights": str(weights), "timings": timings}
    write_json_atomic(layout.summary, {**scores, "shards": len(ds.shards), **extra})
    return ClassifySummary(
        backend, image, ds.classes, len(labels), len(ds.shards), scores["correct"],
        scores["confusion_matrix"]["matrix"], classifier_seconds, seconds, layout.predictions,
        scores["counts"],
    )  # fmt: skip


def _stage_timing(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("classify: ignoring unreadable %s (%s)", path, e)
        return None
    return record if isinstance(record, dict) else None


# --- done-ness ----------------------------------------------------------------------------


def is_current(cfg: PipelineConfig) -> bool:
    """True when the predictions were made from exactly the current shards' bytes, finished,
    and every probs file still passes the output checks. `run` and `status` both ask this."""
    layout = DataLayout(cfg.data_root)
    try:
        stage = json.loads(layout.stage_marker("classify").read_text(encoding="utf-8"))
        if stage.get("inputs") != _inputs(layout) or not layout.predictions_csv.is_file():
            return False
        ds = load_dataset(cfg)
        for shard in ds.shards:
            check_probs(layout.probs(shard.file), shard, len(ds.classes))
    except (OSError, ValueError, AttributeError, DataError, ClassifyError):
        return False
    return True


def state(cfg: PipelineConfig, n: int) -> StageState:
    """One job: complete when the predictions belong to the current shards."""
    shard_files = [s["file"] for s in read_dataset(DataLayout(cfg.data_root))["shards"]]
    complete = is_current(cfg)
    note = "" if complete else "no predictions for the current shards yet"
    done = len(shard_files) if complete else 0
    return StageState("classify", [ShardState(0, done, len(shard_files))], complete, note)


STAGE = Stage(
    "classify",
    run,
    state,
    sharded=False,
    resumes=False,
    unit="output shards",
    product="predictions",
)
