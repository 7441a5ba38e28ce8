"""The Python <-> Julia boundary: the files the classifier reads and writes, one reader each.

* a shard `shard-NNNNN.npz`: `images` float32 (W, H, C, N) Fortran order (Flux's WHCN),
  `labels` and `ids` int64 (N,)
* `dataset.json`: the preprocessed dataset (shape, normalisation, classes, shards + sha256)
* a shard's marker `shard-NNNNN.json`: its rows and rejects, written last (done marker)
* a `shard-NNNNN.probs.npz`: `probs` float32 (N, K), rows summing to 1, and the shard's `ids`

`weights.npz` has its own module, synthflux.weights. docs/architecture.md shows the layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import numpy as np

from synthflux.config import PipelineConfig
from synthflux.errors import ClassifyError, DataError
from synthflux.layout import DatasetPaths, probs_file, shard_index
from synthflux.records import ManifestRecord, iter_records
from synthflux.storage import UNREADABLE
from synthflux.weights import load_weights, spec_of

LAYOUT = "WHCN"  # numpy (W, H, C, N) in Fortran order == Flux's WHCN == C-order (N, C, H, W)
SUM_TOLERANCE = 1e-5  # how far a row of probabilities may be from summing to 1


# --- dataset.json and the shard markers ---------------------------------------------------

RowRecord = TypedDict("RowRecord", {"id": int, "row": int, "label": int, "class": str, "file": str})
RejectRecord = TypedDict("RejectRecord", {"id": int, "file": str, "reason": str, "class": str})


class ShardMarker(TypedDict):
    """preprocessed/shard-NNNNN.json: what one output shard holds, written after its .npz."""

    shard: int
    file: str
    count: int
    sha256: str
    input_key: str  # sha256 of the input records and the preprocess settings
    rows: list[RowRecord]
    rejects: list[RejectRecord]


class ShardEntry(TypedDict):
    file: str
    count: int
    sha256: str


class DatasetInfo(TypedDict):
    """preprocessed/<source>/dataset.json, written when every shard is done."""

    source: str
    split: str  # "train" (also validated on) or "test"
    layout: str
    order: str
    dtype: str
    width: int
    height: int
    channels: int
    shape: list[int]
    normalization: dict[str, object]
    preprocess: dict[str, object]
    classes: list[str]
    counts: dict[str, int]
    rejected: dict[str, int]
    images: int
    shards: list[ShardEntry]


def read_dataset(prepared: DatasetPaths) -> DatasetInfo:
    """dataset.json; a clear error if preprocessing is not complete."""
    path = prepared.dataset
    if not path.is_file():
        raise DataError(f"{path} not found: run `synthflux preprocess` first (to completion)")
    try:
        return cast(DatasetInfo, json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run `synthflux preprocess`") from None


def read_marker(path: Path) -> ShardMarker | None:
    """A shard's done marker, or None if it is missing or unreadable (the shard is redone)."""
    try:
        return cast(ShardMarker, json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


# --- shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    file: str  # "shard-00000.npz"
    path: Path
    ids: np.ndarray
    labels: np.ndarray

    @property
    def probs_file(self) -> str:
        return probs_file(self.file)


@dataclass(frozen=True)
class Dataset:
    source: str
    classes: list[str]
    width: int
    height: int
    channels: int
    shards: list[Shard]

    @property
    def images(self) -> int:
        return sum(len(s.ids) for s in self.shards)


def load_dataset(cfg: PipelineConfig, source: str) -> Dataset:
    """A source's dataset.json plus each listed shard's ids and labels (images stay on disk)."""
    prepared = cfg.layout.prepared(source)
    meta_path = prepared.dataset
    meta = read_dataset(prepared)
    try:
        classes = [str(c) for c in meta["classes"]]
        dims = int(meta["width"]), int(meta["height"]), int(meta["channels"])
        entries = [(str(e["file"]), int(e["count"])) for e in meta["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None
    if classes != cfg.class_names:
        raise DataError(
            f"{meta_path} has classes {classes} but the config has {cfg.class_names}: "
            "re-run preprocess for this config"
        )
    if not entries:
        raise DataError(f"{meta_path} lists no shards: re-run `synthflux preprocess`")
    shards = []
    for name, count in entries:
        if shard_index(name) is None:
            raise DataError(f"{meta_path}: shard file {name!r} is not named shard-NNNNN.npz")
        path = prepared.folder / name
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, labels = z["ids"], z["labels"]
        except FileNotFoundError:
            raise DataError(f"{path} is listed in dataset.json but missing") from None
        except (*UNREADABLE, KeyError) as e:
            raise DataError(f"{path}: cannot read ids/labels ({e})") from None
        if ids.shape != (count,) or labels.shape != (count,):
            raise DataError(
                f"{path}: dataset.json says {count} images, the shard has ids {ids.shape}"
            )
        shards.append(Shard(name, path, ids.astype(np.int64), labels.astype(np.int64)))
    return Dataset(source, classes, *dims, shards)


def read_shard(
    path: Path, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, ids) of a shard, checked as the Julia side checks it.

    `shape` is the (W, H, C) the images must have (the weights' input), if known.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "ids") if k in z.files}
    except UNREADABLE as e:
        raise DataError(f"{path}: not a readable .npz shard ({e})") from None
    for name in ("images", "labels", "ids"):
        if name not in arrays:
            raise DataError(f"{path}: missing array `{name}`")
    images, labels, ids = arrays["images"], arrays["labels"], arrays["ids"]
    if images.dtype != np.float32 or images.ndim != 4:
        raise DataError(
            f"{path}: `images` must be float32 (W, H, C, N), got {images.dtype} {images.shape}"
        )
    n = images.shape[3]
    for name, a in (("labels", labels), ("ids", ids)):
        if a.dtype != np.int64 or a.shape != (n,):
            raise DataError(f"{path}: `{name}` must be int64 ({n},), got {a.dtype} {a.shape}")
    if shape is not None and images.shape[:3] != shape:
        raise DataError(
            f"{path}: images are (W, H, C) = {images.shape[:3]} but the weights expect {shape}"
        )
    if not np.isfinite(images).all():
        raise DataError(f"{path}: `images` holds NaN or Inf")
    return images, labels, ids


# --- the classifier's output -------------------------------------------------------------------


def check_probs(path: Path, shard: Shard, n_classes: int) -> np.ndarray:
    """The (N, K) probabilities of one shard, or a ClassifyError naming the shard."""

    def bad(problem: str) -> ClassifyError:
        return ClassifyError(f"classifier output for {shard.file} ({path.name}): {problem}")

    if not path.is_file():
        raise bad("missing: the classifier did not write it")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"probs", "ids"} <= set(z.files):
                raise bad(f"needs arrays probs and ids, has {sorted(z.files)}")
            probs, ids = z["probs"], z["ids"]
    except ClassifyError:
        raise
    except Exception as e:  # zipfile, numpy and OS errors all mean "not a readable .npz"
        raise bad(f"not a readable .npz ({type(e).__name__}: {e})") from None
    n = len(shard.ids)
    if probs.dtype != np.float32 or probs.shape != (n, n_classes):
        raise bad(f"probs must be float32 ({n}, {n_classes}), got {probs.dtype} {probs.shape}")
    if not np.isfinite(probs).all():
        raise bad("probs has NaN or infinite values")
    if (probs < 0).any():
        raise bad("probs has negative values")
    # initial=0: a shard whose every image was rejected has no rows, which is fine.
    worst = float(np.abs(probs.astype(np.float64).sum(axis=1) - 1.0).max(initial=0.0))
    if worst > SUM_TOLERANCE:
        raise bad(
            f"rows of probs must sum to 1 (within {SUM_TOLERANCE}), worst is off by {worst:.3g}"
        )
    if ids.dtype != np.int64 or ids.shape != (n,):
        raise bad(f"ids must be int64 ({n},), got {ids.dtype} {ids.shape}")
    if not np.array_equal(ids, shard.ids):
        first = int(np.flatnonzero(ids != shard.ids)[0])
        raise bad(f"ids differ from the shard's at row {first}: {ids[first]} != {shard.ids[first]}")
    checked: np.ndarray = probs
    return checked


def dataset_info(
    cfg: PipelineConfig,
    source: str,
    split: str,
    shards: list[ShardEntry],
    counts: dict[str, int],
    rejected: dict[str, int],
) -> DatasetInfo:
    """dataset.json: what a source's preprocessed dataset holds, and how it was made."""
    pre = cfg.preprocess
    return {
        "source": source,
        "split": split,
        "layout": LAYOUT,
        "order": "fortran",
        "dtype": "float32",
        "width": pre.width,
        "height": pre.height,
        "channels": pre.channels,
        "shape": [pre.width, pre.height, pre.channels],
        "normalization": {
            "scale": "1/255 (1/65535 for 16-bit inputs)",
            "mean": pre.mean,
            "std": pre.std,
        },
        "preprocess": pre.model_dump(),
        "classes": cfg.class_names,
        "counts": counts,
        "rejected": rejected,
        "images": sum(counts.values()),
        "shards": shards,
    }


# --- what classify and evaluate read: the weights, and the manifest behind each shard row ---


def weights_path(cfg: PipelineConfig) -> Path:
    """classify.weights, else the trained model (DATA/model/weights.npz)."""
    if cfg.classify.weights:
        return Path(cfg.classify.weights)
    return cfg.layout.default_weights


def model_weights(cfg: PipelineConfig, datasets: list[Dataset]) -> Path:
    """The weights to classify with, checked against the datasets' shape and classes."""
    path = weights_path(cfg)
    if not path.is_file():
        if cfg.classify.weights:
            raise ClassifyError(f"classify.weights = {cfg.classify.weights!r}: no such file")
        raise ClassifyError(
            f"no trained model ({path} not found): run `synthflux train` first, or set "
            "classify.weights to a weights.npz"
        )
    spec = spec_of(load_weights(path))
    have = (spec.width, spec.height, spec.channels, spec.n_classes)
    for ds in datasets:
        want = (ds.width, ds.height, ds.channels, len(ds.classes))
        if have != want:
            raise ClassifyError(
                f"{path} is for {have[0]}x{have[1]}x{have[2]} images and {have[3]} classes, the "
                f"dataset has {want[0]}x{want[1]}x{want[2]} and {want[3]}: point "
                "classify.weights at matching weights (or train again)"
            )
    return path


def join_manifest(manifest: Path, ds: Dataset) -> dict[int, ManifestRecord]:
    """The record of every shard image; its class must be the one the shard's label names."""
    by_id = {int(r["id"]): r for r in iter_records(manifest, "generate or import it again")}
    for shard in ds.shards:
        for image_id, label in zip(shard.ids.tolist(), shard.labels.tolist(), strict=True):
            rec = by_id.get(image_id)
            if rec is None:
                raise DataError(
                    f"{shard.path}: image id {image_id} is not in {manifest}: re-run preprocess"
                )
            if rec.get("class") != ds.classes[label]:  # by name: numbers follow the config
                raise DataError(
                    f"{shard.path}: image id {image_id} is labelled {ds.classes[label]!r}, the "
                    f"manifest says {rec.get('class')!r}: re-run preprocess"
                )
    return by_id
