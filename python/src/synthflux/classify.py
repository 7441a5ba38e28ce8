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
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import preprocess
from synthflux.backends import BACKENDS, Job
from synthflux.backends.supervise import interrupts
from synthflux.config import PipelineConfig
from synthflux.contracts import Dataset, check_probs, load_dataset, read_dataset
from synthflux.errors import ClassifyError, DataError
from synthflux.layout import DataLayout
from synthflux.metrics import summarize
from synthflux.progress import plural
from synthflux.records import ManifestRecord, read_manifest
from synthflux.stages import ShardState, Stage, StageState, read_stage_marker, write_stage_marker
from synthflux.storage import atomic_write, exclusive, sha256_file, write_json_atomic
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
            f"classified {plural(self.images, 'image')} in {plural(self.shards, 'shard')} with {where} in "
            f"{self.classifier_seconds:.1f}s ({rate:.1f} img/s)",
            f"accuracy against the prompt labels: {self.accuracy:.3f} ({self.correct}/{self.images})",
            "confusion matrix (rows: prompt class, columns: predicted class):",
            " " * (width + 3) + " ".join(f"{c:>{max(len(c), 5)}}" for c in self.classes),
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
    layout = DataLayout(cfg.data_root)
    preprocess.require_complete(cfg)
    layout.predictions.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.classify_lock, "classify"):
        # 1. inputs: the shards, their generation records, the weights
        ds = load_dataset(cfg)
        records = _join_manifest(layout, ds)
        weights = ensure_weights(cfg, ds)
        # 2. the classifier, writing only into a private staging folder; 3. every output
        # checked before any is published (the old results stay current until then)
        with _staging(layout.predictions) as staging, interrupts():
            job_shards = tuple(s.file for s in ds.shards)
            job = Job(layout.preprocessed, job_shards, weights, staging, cfg.classify.batch_size)
            run_start = time.monotonic()
            BACKENDS[cfg.classify.backend](cfg, job)
            classifier_seconds = time.monotonic() - run_start
            k = len(ds.classes)
            probs = {s.file: check_probs(staging / s.probs_file, s, k) for s in ds.shards}
            _publish(staging, layout, ds)
        # 4. predictions.csv, summary.json, then stage.json: the done marker
        _write_predictions(layout.predictions_csv, ds, records, probs)
        summary = _summarise(
            cfg, ds, probs, weights, classifier_seconds, time.monotonic() - started
        )
        write_stage_marker(
            layout, "classify", key=inputs_key(cfg, weights), seconds=summary.seconds,
            complete=True, facts={"images": summary.images, "shards": summary.shards,
                                  "accuracy": summary.accuracy, "backend": summary.backend,
                                  "image": summary.image, "outputs": _outputs(layout, ds)},
        )  # fmt: skip
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
    """The weights file. The default one is made from `seed` for the dataset's shape, and made
    again when the seed or the shape changed (model/weights.json says what it was made from)."""
    path = weights_path(cfg)
    if cfg.classify.weights:
        if not path.is_file():
            raise ClassifyError(f"classify.weights = {cfg.classify.weights!r}: no such file")
    else:
        _default_weights(cfg, ds, path)
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


def _default_weights(cfg: PipelineConfig, ds: Dataset, path: Path) -> None:
    made_from = {"seed": cfg.seed, "shape": [ds.width, ds.height, ds.channels, len(ds.classes)]}
    stamp = DataLayout(cfg.data_root).default_weights_stamp
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = None
    if path.is_file() and (recorded is None or recorded == made_from):
        return  # made for this config (or put there by hand: then it is the user's)
    weights = init_weights(ds.width, ds.height, ds.channels, len(ds.classes), seed=cfg.seed)
    save_weights(path, weights)
    write_json_atomic(stamp, made_from)
    log.info("classify: initialised random weights (seed %d): %s", cfg.seed, path)


def inputs_key(cfg: PipelineConfig, weights: Path) -> str:
    """What the predictions are computed from: every shard's bytes (as dataset.json lists
    them), the weights' bytes, and the settings that change the numbers."""
    shards = [[s["file"], s["sha256"]] for s in read_dataset(DataLayout(cfg.data_root))["shards"]]
    c = cfg.classify
    inputs = {"shards": shards, "weights": sha256_file(weights), "backend": c.backend,
              "image": c.image if c.backend == "docker" else None, "batch_size": c.batch_size}  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _outputs(layout: DataLayout, ds: Dataset) -> dict[str, str]:
    """Every published file and its sha256: the result is current only while they match."""
    files = [layout.probs(s.file) for s in ds.shards] + [layout.predictions_csv, layout.summary]
    return {f.name: sha256_file(f) for f in files}


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


def _publish(staging: Path, layout: DataLayout, ds: Dataset) -> None:
    """Move the checked outputs into place; remove those of shards that no longer exist."""
    out = layout.predictions
    owner = out.stat()
    for shard in ds.shards:
        dest = out / shard.probs_file
        os.replace(staging / shard.probs_file, dest)
        if os.geteuid() == 0 and dest.stat().st_uid != owner.st_uid:
            os.chown(dest, owner.st_uid, owner.st_gid)  # written by nobody in the container
    wanted = {s.probs_file for s in ds.shards}
    for old in out.glob("shard-*.probs.npz"):
        if old.name not in wanted:
            old.unlink()


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
    """True when stage.json says the predictions were made from exactly the current shards,
    weights and settings, and every published file is still the one it lists. `run`,
    `status` and `submit` all ask this."""
    layout = DataLayout(cfg.data_root)
    marker = read_stage_marker(layout.stage_marker("classify"))
    weights = weights_path(cfg)
    try:
        if marker is None or not weights.is_file() or marker.get("key") != inputs_key(cfg, weights):
            return False
        outputs = marker.get("outputs") or {}
        return bool(outputs) and all(
            sha256_file(layout.predictions / name) == digest for name, digest in outputs.items()
        )
    except (OSError, DataError, KeyError, TypeError):
        return False


def state(cfg: PipelineConfig, n: int) -> StageState:
    """One job: complete when the predictions belong to the current shards."""
    try:
        shard_files = [s["file"] for s in read_dataset(DataLayout(cfg.data_root))["shards"]]
    except (DataError, KeyError, TypeError):
        shard_files = []
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
