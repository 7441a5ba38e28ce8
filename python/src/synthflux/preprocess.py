"""preprocess: every source's images -> normalised float32 .npz shards.

(A long module: one stage's whole life -- planning, writing, finishing, done-ness -- reads
best in one place; the image work is in images.py, the .npz writer in shardwriter.py, the
preview grids in previews.py.)

Each source (the generated images, and every imported folder: synthflux.sources) is its own
dataset, preprocessed/<source>/. Its manifest's records are taken in a mixed order (a hash of
each id, so every shard holds every class) and cut into output shards of `shard_size`: shard k
holds records [k*S, (k+1)*S) of that order minus the rejected ones. A shard
is the unit of work, resume and `--shard I/N` (numbered across sources); within a shard a
process pool decodes images in parallel (synthflux.images) and the rows are appended in
manifest order (synthflux.shardwriter), so the bytes never depend on the worker count. Each
shard's marker is written last; when every shard of a source has one, its dataset is
finished: manifest.jsonl, rejects.jsonl, previews, dataset.json.
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

from synthflux import lineage
from synthflux.config import PipelineConfig, PreprocessConfig
from synthflux.contracts import (
    DatasetInfo,
    RejectRecord,
    RowRecord,
    ShardEntry,
    ShardMarker,
    dataset_info,
    read_dataset,
    read_marker,
)
from synthflux.errors import DataError
from synthflux.images import Decoder, DecodeResult
from synthflux.layout import DatasetPaths, marker_file, shard_index
from synthflux.previews import write_previews
from synthflux.progress import Progress, plural
from synthflux.records import ManifestRecord, count_records, mixed_records, relabelled
from synthflux.shardwriter import ShardWriter
from synthflux.sources import Source, all_sources
from synthflux.stages import (
    Option,
    ShardState,
    Stage,
    StageState,
    at_least,
    read_stage_marker,
    shard_option,
    write_stage_marker,
)
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


@dataclass
class PreprocessSummary:
    shard: str
    shards_total: int = 0
    shards_done: int = 0
    shards_reused: int = 0
    images: int = 0
    seconds: float = 0.0
    processed: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> per class
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)  # sources whose dataset is complete

    @property
    def complete(self) -> bool:
        return set(self.finished) == set(self.processed)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        made = (f"{self.images} images in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s)"
                if self.images else "nothing new to make")  # fmt: skip
        out = [
            f"shard {self.shard}: {self.shards_done} of {plural(self.shards_total, 'output shard')} "
            f"done here ({self.shards_reused} already done), {made}",
        ]
        for source, processed in self.processed.items():
            out.append(
                f"{source}: processed per class {processed}; rejected per class "
                f"{self.rejected[source]}"
            )
        verb = "written" if self.shards_done else "verified"  # (nothing new: it was there)
        for source in self.finished:
            out.append(f"dataset complete: preprocessed/{source}/dataset.json {verb}")
        return out


def run(
    cfg: PipelineConfig, *, shard: ShardSpec | None = None, workers: int | None = None
) -> PreprocessSummary:
    """Preprocess this process's output shards (skipping verified ones); finish the datasets."""
    shard = shard or ShardSpec()
    layout = cfg.layout
    summary = PreprocessSummary(shard=str(shard))
    # 1. the sources, each finished upstream, and every output shard numbered across them
    sources = _ready_sources(cfg)
    plan = _Plan(sources, cfg.preprocess, shard)
    summary.shards_total = plan.total
    # 2. every shard this process owns, unless it is already done
    start = time.monotonic()
    verified = _process(cfg, plan, summary, workers)
    summary.seconds = time.monotonic() - start
    # 3. each source whose every shard is done is finished; the stage's marker says if all are
    for source in sources:
        if finish_dataset(cfg, source, summary, verified):
            summary.finished.append(source.name)
    finished = [layout.prepared(s.name).dataset for s in sources] if summary.complete else []
    lineage.record(cfg, "preprocess", key=key(cfg), seconds=summary.seconds, outputs=finished,
                   complete=summary.complete, facts={"sources": summary.finished})  # fmt: skip
    return summary


class _Plan:
    """Every source's output shards, numbered across sources; which this process owns."""

    def __init__(self, sources: list[Source], pre: PreprocessConfig, shard: ShardSpec) -> None:
        self.sources, self.shard, size = sources, shard, pre.shard_size
        records = {s.name: count_records(s.paths.manifest) for s in sources}
        counts = {name: -(-n // size) for name, n in records.items()}
        self.first = dict(zip(counts, itertools.accumulate([0, *counts.values()]), strict=False))
        self.total = sum(counts.values())
        self.mine = sum(  # the images of the shards this process owns, for the progress bar
            min(size, n - k * size)
            for name, n in records.items()
            for k in range(counts[name])
            if self.owns(name, k)
        )

    def owns(self, source: str, k: int) -> bool:
        return self.shard.owns(self.first[source] + k)


def _process(
    cfg: PipelineConfig, plan: _Plan, summary: PreprocessSummary, workers: int | None
) -> dict[tuple[str, int], ShardMarker]:
    """Write every owned shard that is not done; return the markers checked on the way."""
    pre, layout = cfg.preprocess, cfg.layout
    verified: dict[tuple[str, int], ShardMarker] = {}
    n_workers = workers or pre.workers or os.cpu_count() or 1
    with Decoder(pre, n_workers) as decode, Progress("preprocess", plan.mine) as progress:
        for source in plan.sources:
            prepared = layout.prepared(source.name)
            prepared.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(prepared.folder)
            for k, records in _shards(source, cfg):
                if not plan.owns(source.name, k):
                    continue
                if (reused := _shard_done(prepared, k, _input_key(records, pre))) is not None:
                    verified[source.name, k] = reused
                    summary.shards_reused += 1
                    progress.update(len(records))
                    continue
                tasks = [(_input_path(source, r), r.get("sha256")) for r in records]
                info = _process_shard(prepared, k, records, pre, progress.counting(decode(tasks)))
                verified[source.name, k] = info
                summary.shards_done += 1
                summary.images += info["count"] + len(info["rejects"])
    return verified


def _ready_sources(cfg: PipelineConfig) -> list[Source]:
    """Every source, each one checked complete upstream (a clear error if not)."""
    lineage.require(cfg, "generate")
    lineage.require(cfg, "filter")
    sources = all_sources(cfg)
    for source in sources:
        if not source.synthetic:
            lineage.require_imported(source.paths)
    if not sources:
        raise DataError(
            "nothing to preprocess: this config makes no images (train.sources has no "
            '"synthetic") and no folder was imported (`synthflux import CONFIG FOLDER --as train`)'
        )
    return sources


# --- one shard ---------------------------------------------------------------------------


def _shards(source: Source, cfg: PipelineConfig) -> Iterator[tuple[int, list[ManifestRecord]]]:
    """The source's records, mixed (records.mixed_records), cut into shards of shard_size,
    each labelled by its class's place in the config's class list now."""
    hint = "run `synthflux generate` first" if source.synthetic else "import it again"
    records = mixed_records(source.paths.manifest, hint, salt=source.name)
    labels = {name: i for i, name in enumerate(cfg.class_names)}
    for k in itertools.count():
        chunk = list(itertools.islice(records, cfg.preprocess.shard_size))
        if not chunk:
            return
        yield k, [relabelled(rec, labels, source.paths.manifest, hint) for rec in chunk]


def _settings(cfg: PreprocessConfig) -> str:
    """The settings the bytes depend on (the worker count does not change them)."""
    return cfg.model_dump_json(exclude={"workers"})


def dataset_key(cfg: PipelineConfig, source: Source) -> str:
    """What a source's dataset was made from: its manifest, the settings and the classes."""
    manifest = sha256_file(source.paths.manifest)
    classes = json.dumps(cfg.class_names)  # their order is the labels'
    return hashlib.sha256(
        f"{manifest}\n{_settings(cfg.preprocess)}\n{classes}".encode()
    ).hexdigest()


def key(cfg: PipelineConfig) -> str:
    """What every source's dataset was made from: the stage's key (synthflux.lineage)."""
    keys = ":".join(dataset_key(cfg, s) for s in all_sources(cfg))
    return hashlib.sha256(keys.encode()).hexdigest()


def _input_key(records: list[ManifestRecord], cfg: PreprocessConfig) -> str:
    """What a shard's bytes depend on: its input records and the preprocessing settings."""
    h = hashlib.sha256(_settings(cfg).encode())
    for r in records:
        h.update(f"{r['id']}:{r['label']}:{r.get('sha256')}:{r['file']}\n".encode())
    return h.hexdigest()


def _shard_done(prepared: DatasetPaths, k: int, key: str) -> ShardMarker | None:
    info = read_marker(prepared.marker(k))
    if info is None:
        return None
    npz = prepared.shard(k)
    if info.get("input_key") != key or not npz.is_file() or sha256_file(npz) != info.get("sha256"):
        return None
    return info


def _input_path(source: Source, record: ManifestRecord) -> str | None:
    """The image's path, or None if the manifest points outside the source (never opened)."""
    path = source.paths.inside(str(record["file"]))
    return str(path) if path is not None else None


def _process_shard(
    prepared: DatasetPaths,
    k: int,
    records: list[ManifestRecord],
    pre: PreprocessConfig,
    images: Iterable[DecodeResult],
) -> ShardMarker:
    """Stream one shard's decoded rows into shard-k.npz; write its marker last; return it."""
    rows: list[RowRecord] = []
    rejects: list[RejectRecord] = []
    npz = prepared.shard(k)
    with ShardWriter(prepared.rows(k), (pre.channels, pre.height, pre.width)) as writer:
        for rec, (pixels, reason) in zip(records, images, strict=True):
            if pixels is None:
                rejects.append({"id": rec["id"], "file": rec["file"], "reason": reason or "",
                                "class": rec["class"]})  # fmt: skip
                continue
            writer.append(pixels)
            rows.append({"id": rec["id"], "row": len(rows), "label": rec["label"],
                         "class": rec["class"], "file": rec["file"]})  # fmt: skip
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
    write_json_atomic(prepared.marker(k), info)
    hold_point("shard")
    return info


# --- the finished dataset ------------------------------------------------------------------


def finish_dataset(
    cfg: PipelineConfig,
    source: Source,
    summary: PreprocessSummary,
    verified: dict[tuple[str, int], ShardMarker],
) -> bool:
    """When every shard of `source` has a valid marker, write its manifest, rejects, previews
    and dataset.json; stage.json, last, says from what (complete or not, with timings)."""
    prepared = cfg.layout.prepared(source.name)
    with file_lock(prepared.lock):
        shards, counts, rejected = _count_shards(cfg, source, verified)
        summary.processed[source.name], summary.rejected[source.name] = counts, rejected
        if shards is not None:
            markers = [prepared.folder / marker_file(s["file"]) for s in shards]
            _write_lists(prepared, markers)
            _remove_stale_shards(prepared, len(shards))
            write_previews(prepared, _read_markers(markers), source, cfg)
            info = dataset_info(cfg, source.name, source.split, shards, counts, rejected)
            write_json_atomic(prepared.dataset, info)
        facts: dict[str, Any] = {"images": sum(counts.values()), "source": source.name}
        if shards is not None:
            facts["dataset_sha256"] = sha256_file(prepared.dataset)
        write_stage_marker(
            prepared.stage_marker, "preprocess", key=dataset_key(cfg, source),
            seconds=summary.seconds, complete=shards is not None, facts=facts,
        )  # fmt: skip
    return shards is not None


def _count_shards(
    cfg: PipelineConfig, source: Source, verified: dict[tuple[str, int], ShardMarker]
) -> tuple[list[ShardEntry] | None, dict[str, int], dict[str, int]]:
    """Every shard's entry and the per-class counts; entries None if a shard is not done."""
    prepared = cfg.layout.prepared(source.name)
    counts = {name: 0 for name in cfg.class_names}
    rejected = {name: 0 for name in cfg.class_names}
    shards: list[ShardEntry] = []  # small per-shard facts only: rows stream from the markers
    for k, records in _shards(source, cfg):
        # Shards this run wrote or verified are not hashed a second time.
        key = _input_key(records, cfg.preprocess)
        info = verified.get((source.name, k)) or _shard_done(prepared, k, key)
        if info is None:
            return None, counts, rejected
        for r in info["rows"]:
            counts[r["class"]] += 1
        for j in info["rejects"]:
            rejected[j["class"]] += 1
        shards.append({"file": info["file"], "count": info["count"], "sha256": info["sha256"]})
    return shards, counts, rejected


def _write_lists(prepared: DatasetPaths, markers: list[Path]) -> None:
    """manifest.jsonl and rejects.jsonl in one pass over the markers (they hold every row)."""
    with (
        atomic_write(prepared.manifest, "w") as manifest,
        atomic_write(prepared.rejects, "w") as rejects,
    ):
        for info in _read_markers(markers):
            for r in info["rows"]:
                manifest.write(json.dumps({**r, "shard": info["file"]}, sort_keys=True) + "\n")
            for j in info["rejects"]:
                rejects.write(json.dumps(j, sort_keys=True) + "\n")


def _remove_stale_shards(prepared: DatasetPaths, n_shards: int) -> None:
    """Shards left from a larger earlier dataset."""
    for stale in prepared.folder.glob("shard-[0-9]*.npz"):
        k = shard_index(stale.name)
        if k is not None and k >= n_shards:
            stale.unlink()
            (prepared.folder / marker_file(stale.name)).unlink(missing_ok=True)


def _read_markers(markers: list[Path]) -> Iterator[ShardMarker]:
    for marker in markers:
        info = read_marker(marker)
        if info is None:
            raise DataError(f"{marker}: unreadable shard marker; re-run `synthflux preprocess`")
        yield info


# --- done-ness ----------------------------------------------------------------------------


def shard_states(cfg: PipelineConfig, source: Source) -> Iterator[tuple[int, ShardMarker | None]]:
    """Each output shard k of `source` with its verified done marker, or None if not done."""
    prepared = cfg.layout.prepared(source.name)
    for k, records in _shards(source, cfg):
        yield k, _shard_done(prepared, k, _input_key(records, cfg.preprocess))


def state(cfg: PipelineConfig, n: int) -> StageState:
    """Output shards done per task of n (numbered across sources); complete once every
    source's dataset.json lists exactly them and was made from its current manifest."""
    shards = [ShardState(i, 0, 0) for i in range(n)]
    complete, g = True, 0
    for source in all_sources(cfg):
        done_files: list[tuple[str, str]] = []
        for _, info in shard_states(cfg, source):
            task = shards[g % n]
            task.total, g = task.total + 1, g + 1
            if info is not None:
                task.done += 1
                done_files.append((info["file"], info["sha256"]))
        try:
            listed = [(s["file"], s["sha256"]) for s in _finished(cfg, source)["shards"]]
        except (DataError, KeyError, TypeError):
            listed = None
        complete = complete and listed == done_files
    shards_done = all(s.complete for s in shards)
    if not (complete and shards_done):
        note = "dataset.json not written yet" if shards_done else ""
        return StageState("preprocess", shards, False, note)
    why = lineage.problem(cfg, "preprocess")  # the datasets as stage.json recorded them
    return StageState("preprocess", shards, why is None, why or "")


def _finished(cfg: PipelineConfig, source: Source) -> DatasetInfo:
    """`source`'s dataset.json, if it is finished and made from the source's current manifest
    with the current settings (else a DataError)."""
    prepared = cfg.layout.prepared(source.name)
    info = read_dataset(prepared)  # its own clear error when missing
    marker = read_stage_marker(prepared.stage_marker)
    key = dataset_key(cfg, source) if source.paths.manifest.is_file() else None
    fresh = marker is not None and marker.get("complete") and marker.get("key") == key
    if not fresh or marker is None or marker.get("dataset_sha256") != sha256_file(prepared.dataset):
        raise DataError(f"{prepared.dataset} is not current: run `synthflux preprocess`")
    return info


STAGE = Stage(
    "preprocess", run, key=key, folder=lambda layout: layout.preprocessed,
    results=lambda cfg: [cfg.layout.prepared(s.name).dataset for s in all_sources(cfg)],
    needs=("generate", "filter"), state=state, sharded=True, resumes=True, unit="output shards",
    product="shards", node_args='--workers "${SLURM_CPUS_PER_TASK:-1}"',
    help="every source's images -> normalised .npz shards",
    description="Decode, orient, convert (grayscale or RGB), resize and normalise every "
    "source's images (generated and imported) into DATA/preprocessed/<source>/shard-NNNNN.npz "
    "(float32, Flux's WHCN layout), with dataset.json, a manifest and rejects.jsonl for "
    "images that cannot be used. Verified shards are skipped, so an interrupted run resumes.",
    options=(
        shard_option("write only output shards k with k %% N == I (numbered across sources)"),
        Option(("--workers",), {"type": at_least(1), "metavar": "K", "help": "decoding processes "
               "(default: preprocess.workers, 0 there = one per CPU core)"}),
    ),
)  # fmt: skip
