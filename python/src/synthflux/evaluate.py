"""evaluate: how well the trained CNN does on images it did not learn from.

Splits: `validation` (the training sources' images the split rule held out:
synthflux.trainplan.is_validation), `train` (the rest, to see overfitting), and every
imported test source under its own name (train on synthetic, test on real). For each:
accuracy, per-class precision/recall/F1, the confusion matrix and counts, in
DATA/evaluation/summary.json, and every image's prediction in DATA/evaluation/predictions.csv.
It reads classify's probabilities, which must be current (synthflux.lineage). Its
"distribution" compares every training source with every test set on the CNN's own features
(synthflux.distribution; the features from the PyTorch twin, synthflux.reference).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import baseline, distribution, lineage, reference
from synthflux.config import PipelineConfig
from synthflux.contracts import (
    check_probs,
    join_manifest,
    load_dataset,
    model_weights,
    read_shard,
    weights_path,
)
from synthflux.distribution import relative_to_real, shown
from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.metrics import confusion_lines, per_class, split_title, summarize
from synthflux.progress import Progress, plural
from synthflux.sources import Source, all_sources, imported, test_sources, training_sources
from synthflux.stages import Stage
from synthflux.storage import atomic_write, sha256_file, write_json_atomic
from synthflux.trainplan import validation_mask
from synthflux.weights import load_weights, spec_of

log = logging.getLogger("synthflux")


@dataclass
class EvaluateSummary:
    classes: list[str]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    distribution: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    complete: bool = True

    def lines(self) -> list[str]:
        out = []
        for name, s in self.splits.items():
            acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
            f1 = s["macro"]["f1"]
            f1_text = "n/a" if f1 is None else f"{f1:.3f}"
            out.append(f"{_split_title(name, s)}: accuracy {acc} ({s['correct']}/{s['images']}), "
                       f"macro F1 {f1_text}")  # fmt: skip
            if s["kind"] == "test":
                out += confusion_lines(self.classes, s["confusion_matrix"]["matrix"],
                                                "true class")  # fmt: skip
        out += baseline.lines(self.baseline)
        out += _distribution_lines(self.distribution)
        return out + self.notes + ["wrote evaluation/summary.json and evaluation/predictions.csv"]


def _split_title(name: str, s: dict[str, Any]) -> str:
    """The split's title with what it holds: "validation split (held out of source train;
    92 images)", "test set test (898 images)"."""
    sources, count = ", ".join(s["sources"]), plural(s["images"], "image")
    held = {"validation": f"held out of source {sources}; ",
            "train": f"learned from, of source {sources}; "}.get(s["kind"], "")  # fmt: skip
    return f"{split_title(name, s['kind'])} ({held}{count})"


def run(
    cfg: PipelineConfig, *, backend: str | None = None, image: str | None = None
) -> EvaluateSummary:
    started = time.monotonic()
    # The backend is part of classify's key: the predictions read are those it made.
    cfg = cfg.with_cnn(backend=backend, image=image)
    layout = cfg.layout
    # 1. the model and current predictions for every source (`synthflux run` makes them first)
    if (why := lineage.problem(cfg, "classify")) is not None:
        if layout.summary.is_file():  # predictions whose model is gone: say that first
            model_weights(cfg, [])
        raise DataError(why)
    if not cfg.classify.weights:  # the split rule is train's: its settings must be current
        lineage.require(cfg, "train")
    weights = weights_path(cfg)
    taken = key(cfg)  # before the work: the weights' bytes the features come from
    # 2. every image into its split; 3. the scores of each split
    rows = _rows(cfg)
    summary = EvaluateSummary(cfg.class_names)
    for name, kind in _split_names(cfg):
        chosen = [r for r in rows if r["split"] == name]
        if chosen:
            summary.splits[name] = _scores(cfg, chosen, kind)
    summary.notes += _warnings(cfg, rows, summary.splits)
    if not any(s["kind"] == "test" for s in summary.splits.values()):
        summary.notes.append(
            "no test set: import real images with `synthflux import CONFIG FOLDER --as test` "
            "to see how the model does on them"
        )
    if "validation" not in summary.splits:
        summary.notes.append(
            "no validation images (train.val_fraction is 0, or too few images): the scores "
            "above are of images the model learned from"
        )
    if not summary.splits:
        raise DataError("nothing to evaluate: no image was classified")
    # 4. each training source against each test set, on the CNN's features
    summary.distribution = _distribution(cfg, weights, taken)
    summary.baseline = baseline.run(cfg)  # the real-only CNN, where there is one
    # 5. summary.json, predictions.csv, then stage.json
    write_json_atomic(layout.evaluation_summary, {
        "classes": cfg.class_names, "splits": summary.splits, "notes": summary.notes,
        "distribution": summary.distribution, "weights": str(weights), "baseline": summary.baseline,
        "trained_on": [s.name for s in training_sources(cfg)]})  # fmt: skip
    _write_csv(layout, cfg.class_names, rows)
    lineage.record(cfg, "evaluate", key=taken, seconds=time.monotonic() - started,
                   outputs=[layout.evaluation_summary, layout.evaluation_csv])  # fmt: skip
    return summary


def _split_names(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(split, kind) in the order they are reported."""
    return [("validation", "validation"), ("train", "train")] + [
        (s.name, "test") for s in test_sources(cfg)
    ]


def _rows(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Every classified image with its split, true label and probabilities."""
    layout = cfg.layout
    training = {s.name for s in training_sources(cfg)}
    t = cfg.train
    rows = []
    for source in all_sources(cfg):
        if source.split == "train" and source.name not in training:
            continue  # imported for training, but this config does not train on it
        ds = load_dataset(cfg, source.name)
        records = join_manifest(source.paths.manifest, ds)  # every shard image's, or a clear error
        for shard in ds.shards:
            probs = check_probs(
                layout.predicted(source.name) / shard.probs_file, shard, len(ds.classes)
            )
            held_out = validation_mask(t.seed, source.name, shard.ids, t.val_fraction)
            for row, image_id in enumerate(shard.ids.tolist()):
                split = _split(source, bool(held_out[row]))
                rec = records[image_id]
                rows.append({"split": split, "source": source.name, "id": image_id,
                             "name": rec.get("name", ""), "file": rec.get("file", ""),
                             "label": int(shard.labels[row]), "probs": probs[row],
                             "sha256": rec.get("sha256")})  # fmt: skip
    return rows


def _warnings(cfg: PipelineConfig, rows: list[dict[str, Any]], splits: dict[str, Any]) -> list[str]:
    """Said loudly (logged, and in summary.json and the report): a test set that has nothing
    left to score, and test images byte-identical to training images (their scores flatter)."""
    out = []
    learned = {r["sha256"] for r in rows if r["split"] in ("train", "validation") and r["sha256"]}
    for source in test_sources(cfg):
        if source.name not in splits:
            out.append(
                f"WARNING: test set {source.name!r} has no image to score (preprocess rejected "
                f"every one: {cfg.layout.prepared(source.name).rejects})"
            )
            continue
        same = [r for r in rows if r["split"] == source.name and r["sha256"] in learned]
        if same:
            counts = Counter(cfg.class_names[r["label"]] for r in same)
            per_class = {c: counts[c] for c in cfg.class_names if counts[c]}
            out.append(
                f"WARNING: {len(same)} of {splits[source.name]['images']} images of test set "
                f"{source.name!r} are byte-identical to training images (per class: "
                f"{per_class}): its scores overstate how the model does on unseen images"
            )
    for line in out:
        log.warning("evaluate: %s", line)
    return out


def _split(source: Source, held_out: bool) -> str:
    if source.split == "test":
        return source.name
    return "validation" if held_out else "train"


def _scores(cfg: PipelineConfig, rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    labels = np.array([r["label"] for r in rows], np.int64)
    probs = np.stack([r["probs"] for r in rows])
    scores = summarize(labels, probs, cfg.class_names, rows="true class")
    sources = sorted({r["source"] for r in rows})
    return {"kind": kind, "sources": sources, **scores,
            **per_class(scores["confusion_matrix"]["matrix"], cfg.class_names)}  # fmt: skip


def _distribution(cfg: PipelineConfig, weights_file: Path, taken: str) -> dict[str, Any]:
    """distribution.section over every training and test source's features, from the weights
    whose bytes the key `taken` holds (changed since: an error, nothing published)."""
    train = [s.name for s in training_sources(cfg)]
    # Real training images, trained on or not: real against real is the best to expect.
    train += [s.name for s in imported(cfg.layout) if s.split == "train" and s.name not in train]
    test = [s.name for s in test_sources(cfg)]
    if not test:
        return {}
    weights = load_weights(weights_file)
    if key(cfg) != taken:
        raise DataError(
            f"{weights_file} or the predictions changed while evaluating: run `synthflux "
            "evaluate` again"
        )
    model = reference.build_model(weights)
    spec = spec_of(weights)
    datasets = {name: load_dataset(cfg, name) for name in train + test}
    features = {}
    total = sum(len(s.labels) for ds in datasets.values() for s in ds.shards)
    with Progress("evaluate: features", total) as progress:
        for name, ds in datasets.items():
            parts, labels = [], []
            for shard in ds.shards:
                images, shard_labels, _ = read_shard(
                    shard.path, (spec.width, spec.height, spec.channels)
                )
                parts.append(reference.features(weights, images, model=model))
                labels.append(shard_labels)
                progress.update(len(shard_labels))
            features[name] = (np.concatenate(parts), np.concatenate(labels))
    section = distribution.section(features, train, test, cfg.class_names)
    real = [s.name for s in imported(cfg.layout) if s.split == "train"]
    section["reference"] = real[0] if real else None
    return section


def _distribution_lines(d: dict[str, Any]) -> list[str]:
    """A short table: each training source against each test set, over all images."""
    if not d:
        return []
    out = [f"distribution ({d['note']}):"]
    for c in d["comparisons"]:
        m, dup = c["overall"], d["sources"][c["train"]]["rate"]
        out.append(f"  {c['train']} vs {c['test']} ({m['images']['train']} vs "
                   f"{m['images']['test']} images): FD {shown(m['fd'], '.3g')}, KID "
                   f"{shown(m['kid'], '.3g')}, precision {shown(m['precision'], '.2f')}, recall "
                   f"{shown(m['recall'], '.2f')}, density {shown(m['density'], '.2f')}, coverage "
                   f"{shown(m['coverage'], '.2f')}, diversity {shown(m['diversity'], '.2f')}, "
                   f"duplicates {shown(dup, '.1%')}")  # fmt: skip
    if any(v is None for c in d["comparisons"] for v in c["overall"].values()):
        out.append(f"  ({d['n/a']})")
    return out + [f"  {line}" for line in relative_to_real(d)]


def _write_csv(layout: DataLayout, classes: list[str], rows: list[dict[str, Any]]) -> None:
    header = ["split", "source", "id", "name", "file", "class", "label"]
    header += [f"p_{c}" for c in classes] + ["predicted", "correct"]
    with atomic_write(layout.evaluation_csv, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for r in rows:
            predicted = int(np.argmax(r["probs"]))
            writer.writerow(
                [r["split"], r["source"], r["id"], r["name"], r["file"], classes[r["label"]],
                 r["label"], *(f"{v:.6f}" for v in r["probs"].tolist()), classes[predicted],
                 int(predicted == r["label"])]
            )  # fmt: skip


# --- done-ness ----------------------------------------------------------------------------


def key(cfg: PipelineConfig) -> str:
    """The predictions it reads (classify's key and outputs, as its stage.json records them:
    lineage checks those against the files), the split rule's settings, and the weights'
    sha256 and distribution.VERSION (the features are computed from the weights here)."""
    marker = lineage.marker(cfg, "classify") or {}
    t = cfg.train
    inputs = {"classify": marker.get("key"), "outputs": marker.get("outputs"), "seed": t.seed,
              "val_fraction": t.val_fraction, "sources": t.sources,
              "weights": sha256_file(weights_path(cfg)), "distribution": distribution.VERSION}  # fmt: skip
    if found := baseline.inputs(cfg):  # (keys without a baseline stay as they were)
        inputs["baseline"] = {"datasets": found, "train": t.model_dump(exclude={"timeout_s"})}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


STAGE = Stage(
    "evaluate", run, key=key, folder=lambda layout: layout.evaluation,
    results=lambda cfg: [cfg.layout.evaluation_summary, cfg.layout.evaluation_csv],
    needs=("train", "classify"), runs_cnn=True, unit="evaluations", product="evaluations",
    help="the scores on the validation split, the training images and each test source",
    description="Score classify's predictions: the validation split (training images held "
    "out), the training images themselves, and every imported test source -- accuracy, "
    "per-class precision/recall/F1 and the confusion matrix -- and, on the CNN's own "
    "features, how alike each training source and each test set are (FD, KID, precision/"
    "recall/density/coverage, diversity, duplicates; not comparable with Inception FID) -- in "
    "DATA/evaluation/summary.json and predictions.csv. The predictions must be current: "
    "`synthflux run` makes them first.",
)  # fmt: skip
