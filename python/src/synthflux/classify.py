"""classify: the trained CNN over every source's shards, its probabilities checked,
joined with the sources' manifests and summarised.

One classifier run per source covers all its shards (one container, one `julia`, or the
in-process PyTorch twin: synthflux.backends). It writes into a private staging folder; every
expected `shard-NNNNN.probs.npz` is read back and checked before anything is published, then
moved into DATA/predictions/<source>/, followed by predictions.csv, summary.json and, last,
stage.json (the done marker). docs/classify.md has the design.
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import lineage
from synthflux.backends import Job, backend_for, choose
from synthflux.backends.supervise import interrupts
from synthflux.config import PipelineConfig
from synthflux.contracts import (
    Dataset,
    check_probs,
    join_manifest,
    load_dataset,
    model_weights,
    read_dataset,
    weights_path,
)
from synthflux.errors import ClassifyError, DataError
from synthflux.layout import DataLayout
from synthflux.metrics import confusion_lines, summarize
from synthflux.progress import plural
from synthflux.records import ManifestRecord
from synthflux.sources import Source, all_sources
from synthflux.stages import Stage, StageState
from synthflux.storage import atomic_write, exclusive, sha256_file, write_json_atomic

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
    scores: dict[str, dict[str, Any]]  # source -> metrics.summarize(...)
    shards: int
    classifier_seconds: float
    seconds: float
    out_dir: Path
    complete: bool = True

    @property
    def images(self) -> int:
        return sum(s["images"] for s in self.scores.values())

    @property
    def correct(self) -> int:
        return sum(s["correct"] for s in self.scores.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    @property
    def confusion(self) -> list[list[int]]:
        """Over every source together."""
        k = len(self.classes)
        total = np.zeros((k, k), dtype=np.int64)
        for s in self.scores.values():
            total += np.asarray(s["confusion_matrix"]["matrix"], dtype=np.int64)
        return total.tolist()

    def lines(self) -> list[str]:
        where = BACKEND_NAMES[self.backend].format(image=self.image)
        rate = self.images / max(self.classifier_seconds, 1e-9)
        out = [
            f"classified {plural(self.images, 'image')} in {plural(self.shards, 'shard')} with "
            f"{where} in {self.classifier_seconds:.1f}s ({rate:.1f} img/s)"
        ]
        for source, s in self.scores.items():
            labels = "prompt labels" if source == "synthetic" else "folder labels"
            accuracy = f"{s['accuracy']:.3f}" if s["accuracy"] is not None else "n/a"
            out.append(f"{source}: accuracy against the {labels}: {accuracy} "
                       f"({s['correct']}/{s['images']})")  # fmt: skip
            out += confusion_lines(self.classes, s["confusion_matrix"]["matrix"], "true class")
        out.append(f"wrote {self.out_dir / 'predictions.csv'} and summary.json")
        return out


def run(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> ClassifySummary:
    """Run the classifier over every source's shards, check its outputs, write the predictions."""
    started = time.monotonic()
    cfg = choose(cfg.with_cnn(backend=backend, image=image))
    layout = cfg.layout
    # 1. inputs: every source's finished dataset, its records, the trained weights
    sources = _ready(cfg)
    datasets = {s.name: load_dataset(cfg, s.name) for s in sources}
    weights = model_weights(cfg, list(datasets.values()))
    records = {s.name: join_manifest(s.paths.manifest, datasets[s.name]) for s in sources}
    key = inputs_key(cfg, weights)  # before the work: what the predictions are made from
    layout.predictions.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.classify_lock, "classify"):
        # 2. the classifier into a private staging folder; 3. every output checked before any
        # is published (the previous results stay current until then)
        with _staging(layout.predictions) as staging, interrupts():
            run_start = time.monotonic()
            cnn = backend_for(cfg)
            for s in sources:
                cnn.classify(_job(cfg, s, datasets[s.name], weights, staging))
            classifier_seconds = time.monotonic() - run_start
            probs = {s.name: _checked(datasets[s.name], staging / s.name) for s in sources}
            if inputs_key(cfg, weights) != key:  # e.g. train published new weights meanwhile
                raise ClassifyError(
                    f"{weights} or the shards changed while classifying (did `synthflux train` "
                    "finish meanwhile?): nothing was published; run `synthflux classify` again"
                )
            _publish(staging, layout, datasets)
        # 4. predictions.csv, summary.json, then stage.json: the done marker
        _write_predictions(layout.predictions_csv, datasets, records, probs)
        summary = _summarise(cfg, datasets, probs, weights, classifier_seconds, started)
        lineage.record(
            cfg, "classify", key=key, seconds=summary.seconds,
            outputs=_outputs(layout, datasets),
            facts={"images": summary.images, "shards": summary.shards,
                   "backend": summary.backend, "image": summary.image},
        )  # fmt: skip
    return summary


# --- inputs --------------------------------------------------------------------------------


def _ready(cfg: PipelineConfig) -> list[Source]:
    sources = all_sources(cfg)
    if not sources:
        raise DataError("nothing to classify: no source was generated or imported")
    lineage.require(cfg, "preprocess")
    return sources


def _job(cfg: PipelineConfig, source: Source, ds: Dataset, weights: Path, staging: Path) -> Job:
    output = staging / source.name
    output.mkdir()
    prepared = cfg.layout.prepared(source.name)
    return Job(
        "classify", ((source.name, prepared.folder),), tuple(s.file for s in ds.shards), weights,
        output, cfg.layout.relative(cfg.layout.predicted(source.name)),
        ("--batch-size", str(cfg.cnn.batch_size)), timeout_s=cfg.cnn.timeout_s,
    )  # fmt: skip


def inputs_key(cfg: PipelineConfig, weights: Path) -> str:
    """What the predictions are computed from: every source's shards (as dataset.json lists
    them), the weights' bytes, and the settings that change the numbers."""
    layout = cfg.layout
    shards = {}
    for s in all_sources(cfg):
        info = read_dataset(layout.prepared(s.name))
        shards[s.name] = [[e["file"], e["sha256"]] for e in info["shards"]]
    c = choose(cfg).cnn
    inputs = {"shards": shards, "weights": sha256_file(weights), "backend": c.backend,
              "image": c.image if c.backend == "docker" else None, "batch_size": c.batch_size}  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _outputs(layout: DataLayout, datasets: dict[str, Dataset]) -> list[Path]:
    """Every published file: the result is current only while they are unchanged."""
    files = [
        layout.predicted(name) / s.probs_file for name, ds in datasets.items() for s in ds.shards
    ]
    return [*files, layout.predictions_csv, layout.summary]


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


def _checked(ds: Dataset, folder: Path) -> dict[str, np.ndarray]:
    return {s.file: check_probs(folder / s.probs_file, s, len(ds.classes)) for s in ds.shards}


def _publish(staging: Path, layout: DataLayout, datasets: dict[str, Dataset]) -> None:
    """Move the checked outputs into place; remove those of shards or sources now gone."""
    for name, ds in datasets.items():
        out = layout.predicted(name)
        out.mkdir(parents=True, exist_ok=True)
        owner = layout.predictions.stat()
        for shard in ds.shards:
            dest = out / shard.probs_file
            os.replace(staging / name / shard.probs_file, dest)
            if os.geteuid() == 0 and dest.stat().st_uid != owner.st_uid:
                os.chown(dest, owner.st_uid, owner.st_gid)  # written by nobody in the container
        wanted = {s.probs_file for s in ds.shards}
        for old in out.glob("shard-*.probs.npz"):
            if old.name not in wanted:
                old.unlink()
    for folder in layout.predictions.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in datasets:
            shutil.rmtree(folder)


# --- predictions.csv and summary.json ---------------------------------------------------------


def _write_predictions(
    path: Path,
    datasets: dict[str, Dataset],
    records: dict[str, dict[int, ManifestRecord]],
    probs: dict[str, dict[str, np.ndarray]],
) -> None:
    classes = next(iter(datasets.values())).classes
    header = ["id", "source", "name", "class", "label", "prompt", "seed", "file"]
    header += [f"p_{c}" for c in classes] + ["predicted"]
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for source, ds in datasets.items():
            for shard in ds.shards:
                p = probs[source][shard.file]
                for row, image_id in enumerate(shard.ids.tolist()):
                    rec = records[source][image_id]
                    label = int(shard.labels[row])
                    writer.writerow(
                        [image_id, source, rec.get("name", ""), classes[label], label,
                         rec.get("prompt", ""), rec.get("seed", ""), rec.get("file", ""),
                         *(f"{v:.6f}" for v in p[row].tolist()), classes[int(p[row].argmax())]]
                    )  # fmt: skip


def _summarise(
    cfg: PipelineConfig,
    datasets: dict[str, Dataset],
    probs: dict[str, dict[str, np.ndarray]],
    weights: Path,
    classifier_seconds: float,
    started: float,
) -> ClassifySummary:
    """Per source and in all: accuracy, confusion matrix, mean probabilities, into summary.json."""
    layout = cfg.layout
    classes = next(iter(datasets.values())).classes
    per_source, all_labels, all_probs = {}, [], []
    for name, ds in datasets.items():
        labels = np.concatenate([s.labels for s in ds.shards])
        p = np.concatenate([probs[name][s.file] for s in ds.shards])
        per_source[name] = summarize(labels, p, classes, rows="true class")
        all_labels.append(labels)
        all_probs.append(p)
    overall = summarize(
        np.concatenate(all_labels), np.concatenate(all_probs), classes, "true class"
    )
    timings: dict[str, Any] = {}
    for stage in ("finetune", "generate", "filter", "preprocess", "train"):  # those that ran
        if (timing := lineage.marker(cfg, stage)) is not None:
            timings[stage] = timing
    seconds = time.monotonic() - started
    timings["classify"] = {"stage": "classify", "seconds": seconds,
                           "classifier_seconds": classifier_seconds}  # fmt: skip
    backend = cfg.cnn.backend
    image = cfg.cnn.image if backend == "docker" else None
    n_shards = sum(len(ds.shards) for ds in datasets.values())
    write_json_atomic(
        layout.summary,
        {**overall, "shards": n_shards, "sources": per_source, "backend": backend,
         "image": image, "weights": str(weights), "timings": timings},
    )  # fmt: skip
    return ClassifySummary(backend, image, classes, per_source, n_shards, classifier_seconds,
                           seconds, layout.predictions)  # fmt: skip


# --- done-ness ----------------------------------------------------------------------------


def key(cfg: PipelineConfig) -> str:
    """The stage's key (synthflux.lineage): no weights, no key (nothing is current)."""
    return inputs_key(cfg, weights_path(cfg))


def state(cfg: PipelineConfig, n: int) -> StageState:
    """One job: complete when the predictions belong to the current shards and weights."""
    total = 0
    for s in all_sources(cfg):
        with suppress(OSError, ValueError, KeyError, TypeError, DataError):
            total += len(read_dataset(cfg.layout.prepared(s.name))["shards"])
    return lineage.one_job_state(cfg, "classify", total)


STAGE = Stage(
    "classify", run, key=key, folder=lambda layout: layout.predictions,
    results=lambda cfg: [cfg.layout.summary, cfg.layout.predictions_csv],
    needs=("preprocess", "train"), state=state, runs_cnn=True, unit="output shards",
    product="predictions",
    help="every source's shards -> class probabilities (the trained CNN)",
    description="Run the trained CNN (julia/flux_model.jl; --backend reference: its PyTorch "
    "twin) over every source's shards in DATA/preprocessed/<source>/ -- with backend docker "
    "in one locked-down container per source (no network, no capabilities, non-root, "
    "read-only inputs) -- check every DATA/predictions/<source>/shard-NNNNN.probs.npz it "
    "writes, then write predictions.csv and summary.json (accuracy against the labels, "
    "confusion matrix, per source). The weights are DATA/model/weights.npz (from `synthflux "
    "train`) unless classify.weights names others.",
)  # fmt: skip
