"""Stage 2, preprocess: generated PNGs -> normalised float32 .npz shards for the classifier.

The generation manifest is streamed in order and cut into output shards of `shard_size`
records: shard k holds records [k*S, (k+1)*S) minus the rejected ones. A shard is the unit of
work, resume and `--shard I/N`; within a shard a process pool decodes images in parallel
(synthflux.images) and the rows are appended in manifest order (synthflux.shardwriter), so the
bytes never depend on the worker count. Each shard's marker is written last; when every shard
has one, the dataset is finished: manifest.jsonl, rejects.jsonl, previews, dataset.json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import generate
from synthflux.config import PipelineConfig, PreprocessConfig
from synthflux.contracts import (
    LAYOUT,
    DatasetInfo,
    RejectRecord,
    RowRecord,
    ShardEntry,
    ShardMarker,
    read_dataset,
    read_marker,
)
from synthflux.errors import DataError, Rejected
from synthflux.images import Decoder, DecodeResult, preview
from synthflux.layout import DataLayout, marker_file, shard_index
from synthflux.progress import Progress, plural
from synthflux.records import ManifestRecord, count_manifest, iter_manifest
from synthflux.shardwriter import ShardWriter
from synthflux.stages import ShardState, Stage, StageState, read_stage_marker, write_stage_marker
from synthflux.storage import (
    ShardSpec,
    atomic_write,
    file_lock,
    hold_point,
    remove_stale_temps,
    sha256_file,
    write_json_atomic,
)

log = logging.getLogger("synthflux")

PREVIEWS_PER_CLASS = 4


@dataclass
class PreprocessSummary:
    shard: str
    shards_total: int = 0
    shards_done: int = 0
    shards_reused: int = 0
    images: int = 0
    seconds: float = 0.0
    processed: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"shard {self.shard}: {self.shards_done} of {plural(self.shards_total, 'output shard')} "
            "done here "
            f"({self.shards_reused} already done), {self.images} images in {self.seconds:.1f}s "
            f"({self.images_per_s:.1f} img/s)",
            f"processed per class {self.processed}; rejected per class {self.rejected}",
        ]
        if self.complete:
            out.append("dataset complete: preprocessed/dataset.json written")
        return out


def run(
    cfg: PipelineConfig, *, shard: ShardSpec | None = None, workers: int | None = None
) -> PreprocessSummary:
    """Preprocess this process's output shards (skipping verified ones); finish the dataset."""
    shard = shard or ShardSpec()
    pre = cfg.preprocess
    layout = DataLayout(cfg.data_root)
    summary = PreprocessSummary(shard=str(shard))
    generate.require_complete(cfg)
    n_records = count_manifest(layout)
    summary.shards_total = -(-n_records // pre.shard_size)
    mine = sum(1 for k in range(summary.shards_total) if shard.owns(k))
    layout.preprocessed.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(layout.preprocessed)
    start = time.monotonic()
    verified: dict[int, ShardMarker] = {}  # shard -> its marker, checked in this run
    n_workers = workers or pre.workers or os.cpu_count() or 1
    with (
        Decoder(pre, n_workers) as decode,
        Progress("preprocess", min(mine * pre.shard_size, n_records)) as progress,
    ):
        for k, records in _shards(layout, pre):
            if not shard.owns(k):
                continue
            if (reused := _shard_done(layout, k, _input_key(records, pre))) is not None:
                verified[k] = reused
                summary.shards_reused += 1
                progress.update(len(records))
                continue
            tasks = [(_input_path(layout, r), r.get("sha256")) for r in records]
            info = _process_shard(k, records, cfg, _counted(decode(tasks), progress))
            verified[k] = info
            summary.shards_done += 1
            summary.images += info["count"] + len(info["rejects"])
    summary.seconds = time.monotonic() - start
    summary.complete = finish_dataset(cfg, summary, verified)
    return summary


def _counted(results: Iterable[DecodeResult], progress: Progress) -> Iterator[DecodeResult]:
    for r in results:
        progress.update()
        yield r


# --- one shard ---------------------------------------------------------------------------


def _shards(
    layout: DataLayout, pre: PreprocessConfig
) -> Iterator[tuple[int, list[ManifestRecord]]]:
    records = iter_manifest(layout)
    for k in itertools.count():
        chunk = list(itertools.islice(records, pre.shard_size))
        if not chunk:
            return
        yield k, chunk


def _settings(cfg: PreprocessConfig) -> str:
    """The settings the bytes depend on (the worker count does not change them)."""
    return cfg.model_dump_json(exclude={"workers"})


def dataset_key(cfg: PipelineConfig) -> str:
    """What the whole dataset was made from: generate's manifest and the settings."""
    manifest = sha256_file(DataLayout(cfg.data_root).manifest)
    return hashlib.sha256(f"{manifest}\n{_settings(cfg.preprocess)}".encode()).hexdigest()


def _input_key(records: list[ManifestRecord], cfg: PreprocessConfig) -> str:
    """What a shard's bytes depend on: its input records and the preprocessing settings."""
    h = hashlib.sha256(_settings(cfg).encode())
    for r in records:
        h.update(f"{r['id']}:{r['label']}:{r.get('sha256')}:{r['file']}\n".encode())
    return h.hexdigest()


def _shard_done(layout: DataLayout, k: int, key: str) -> ShardMarker | None:
    info = read_marker(layout.shard_marker(k))
    if info is None:
        return None
    npz = layout.shard(k)
    if info.get("input_key") != key or not npz.is_file() or sha256_file(npz) != info.get("sha256"):
        return None
    return info


def _input_path(layout: DataLayout, record: ManifestRecord) -> str | None:
    """The image's path, or None if the manifest points outside generated/ (never opened)."""
    path = layout.inside_generated(str(record["file"]))
    return str(path) if path is not None else None


def _process_shard(
    k: int, records: list[ManifestRecord], cfg: PipelineConfig, images: Iterable[DecodeResult]
) -> ShardMarker:
    """Stream one shard's decoded rows into shard-k.npz; write its marker last; return it."""
    pre = cfg.preprocess
    layout = DataLayout(cfg.data_root)
    rows: list[RowRecord] = []
    rejects: list[RejectRecord] = []
    npz = layout.shard(k)
    with ShardWriter(layout.shard_rows(k), (pre.channels, pre.height, pre.width)) as writer:
        for rec, (pixels, reason) in zip(records, images, strict=True):
            if pixels is None:
                rejects.append(
                    {
                        "id": rec["id"],
                        "file": rec["file"],
                        "reason": reason or "",
                        "class": rec["class"],
                    }
                )
                continue
            writer.append(pixels)
            rows.append(
                {"id": rec["id"], "row": len(rows), "label": rec["label"], "class": rec["class"],
                 "file": rec["file"]}
            )  # fmt: skip
        writer.finish(
            npz,
            labels=np.array([r["label"] for r in rows], np.int64),
            ids=np.array([r["id"] for r in rows], np.int64),
        )
    info: ShardMarker = {
        "shard": k,
        "file": npz.name,
        "count": len(rows),
        "sha256": sha256_file(npz),
        "input_key": _input_key(records, pre),
        "rows": rows,
        "rejects": rejects,
    }
    write_json_atomic(layout.shard_marker(k), info)
    hold_point("shard")
    return info


# --- the finished dataset ------------------------------------------------------------------


def finish_dataset(
    cfg: PipelineConfig, summary: PreprocessSummary, verified: dict[int, ShardMarker]
) -> bool:
    """When every shard has a valid marker, write manifest, rejects, previews, dataset.json."""
    layout = DataLayout(cfg.data_root)
    with file_lock(layout.dataset_lock):
        shards, counts, rejected = _count_shards(cfg, layout, verified)
        summary.processed, summary.rejected = counts, rejected
        if shards is not None:
            markers = [layout.preprocessed / marker_file(s["file"]) for s in shards]
            _write_lists(layout, markers)
            _remove_stale_shards(layout, len(shards))
            _write_previews(layout, _read_markers(markers), cfg)
            write_json_atomic(layout.dataset, _dataset_info(cfg, shards, counts, rejected))
        facts: dict[str, Any] = {"images": sum(counts.values())}
        if shards is not None:
            facts["dataset_sha256"] = sha256_file(layout.dataset)
        write_stage_marker(
            layout, "preprocess", key=dataset_key(cfg), seconds=summary.seconds,
            complete=shards is not None, facts=facts,
        )  # fmt: skip
    return shards is not None


def _count_shards(
    cfg: PipelineConfig, layout: DataLayout, verified: dict[int, ShardMarker]
) -> tuple[list[ShardEntry] | None, dict[str, int], dict[str, int]]:
    """Every shard's entry and the per-class counts; entries None if a shard is not done."""
    counts = {name: 0 for name in cfg.class_names}
    rejected = {name: 0 for name in cfg.class_names}
    shards: list[ShardEntry] = []  # small per-shard facts only: rows stream from the markers
    for k, records in _shards(layout, cfg.preprocess):
        # Shards this run wrote or verified are not hashed a second time.
        info = verified.get(k) or _shard_done(layout, k, _input_key(records, cfg.preprocess))
        if info is None:
            return None, counts, rejected
        for r in info["rows"]:
            counts[r["class"]] += 1
        for j in info["rejects"]:
            rejected[j["class"]] += 1
        shards.append({"file": info["file"], "count": info["count"], "sha256": info["sha256"]})
    return shards, counts, rejected


def _write_lists(layout: DataLayout, markers: list[Path]) -> None:
    """manifest.jsonl and rejects.jsonl in one pass over the markers (they hold every row)."""
    with (
        atomic_write(layout.preprocessed_manifest, "w") as manifest,
        atomic_write(layout.rejects, "w") as rejects,
    ):
        for info in _read_markers(markers):
            for r in info["rows"]:
                manifest.write(json.dumps({**r, "shard": info["file"]}, sort_keys=True) + "\n")
            for j in info["rejects"]:
                rejects.write(json.dumps(j, sort_keys=True) + "\n")


def _remove_stale_shards(layout: DataLayout, n_shards: int) -> None:
    """Shards left from a larger earlier dataset."""
    for stale in layout.preprocessed.glob("shard-[0-9]*.npz"):
        k = shard_index(stale.name)
        if k is not None and k >= n_shards:
            stale.unlink()
            (layout.preprocessed / marker_file(stale.name)).unlink(missing_ok=True)


def _dataset_info(
    cfg: PipelineConfig, shards: list[ShardEntry], counts: dict[str, int], rejected: dict[str, int]
) -> DatasetInfo:
    pre = cfg.preprocess
    return {
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


def _read_markers(markers: list[Path]) -> Iterator[ShardMarker]:
    for marker in markers:
        info = read_marker(marker)
        if info is None:
            raise DataError(f"{marker}: unreadable shard marker; re-run `synthflux preprocess`")
        yield info


def _write_previews(layout: DataLayout, infos: Iterable[ShardMarker], cfg: PipelineConfig) -> None:
    """A few images per class as the model sees them (images.preview), decoded again from the
    source PNGs, which keeps memory flat: no shard is loaded whole."""
    layout.previews.mkdir(exist_ok=True)
    written = set()
    for r in _preview_rows(infos, cfg.class_names):
        try:
            im = preview(layout.inside_generated(r["file"]) or Path(), cfg.preprocess)
        except Rejected as e:  # the source changed since its shard was made: skip it
            log.warning("preprocess: no preview for %s: %s", r["file"], e)
            continue
        path = layout.preview(r["class"], r["id"])
        with atomic_write(path) as f:
            im.save(f, format="PNG")
        written.add(path)
    for old in layout.previews.glob("*.png"):  # of images no longer in the dataset
        if old not in written:
            old.unlink()


def _preview_rows(infos: Iterable[ShardMarker], classes: list[str]) -> Iterator[RowRecord]:
    """The first PREVIEWS_PER_CLASS rows of every class."""
    wanted = dict.fromkeys(classes, PREVIEWS_PER_CLASS)
    for info in infos:
        for r in info["rows"]:
            if wanted[r["class"]] > 0:
                wanted[r["class"]] -= 1
                yield r
        if not any(wanted.values()):
            return


# --- done-ness ----------------------------------------------------------------------------


def shard_states(cfg: PipelineConfig) -> Iterator[tuple[int, ShardMarker | None]]:
    """Each output shard k with its verified done marker, or None if it is not done (yet)."""
    layout = DataLayout(cfg.data_root)
    for k, records in _shards(layout, cfg.preprocess):
        yield k, _shard_done(layout, k, _input_key(records, cfg.preprocess))


def state(cfg: PipelineConfig, n: int) -> StageState:
    """Output shards done per task of n; complete once dataset.json lists exactly them and was
    made from the current manifest and settings."""
    layout = DataLayout(cfg.data_root)
    shards = [ShardState(i, 0, 0) for i in range(n)]
    done_files: list[tuple[str, str]] = []
    for k, info in shard_states(cfg):
        task = shards[k % n]
        task.total += 1
        if info is not None:
            task.done += 1
            done_files.append((info["file"], info["sha256"]))
    try:
        require_complete(cfg)
        listed = [(s["file"], s["sha256"]) for s in read_dataset(layout)["shards"]]
    except (DataError, KeyError, TypeError):
        listed = None
    shards_done = all(s.complete for s in shards)
    complete = shards_done and listed == done_files
    note = "" if complete or not shards_done else "dataset.json not written yet"
    return StageState("preprocess", shards, complete, note)


def require_complete(cfg: PipelineConfig) -> None:
    """For the stages after preprocess: a clear error unless dataset.json is finished and was
    made from the current manifest with the current settings."""
    layout = DataLayout(cfg.data_root)
    read_dataset(layout)  # its own clear error when missing
    marker = read_stage_marker(layout.stage_marker("preprocess"))
    fresh = marker is not None and marker.get("complete") and marker.get("key") == dataset_key(cfg)
    if not fresh or marker is None or marker.get("dataset_sha256") != sha256_file(layout.dataset):
        raise DataError(
            f"{layout.dataset} is not the dataset of the current manifest and [preprocess] "
            "settings: run `synthflux preprocess`"
        )


STAGE = Stage(
    "preprocess", run, state, sharded=True, resumes=True, unit="output shards", product="shards"
)
