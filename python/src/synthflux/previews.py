"""A few images per class as the model sees them (preprocessed/<source>/previews/), for a
person to check the preprocessing at a glance."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from synthflux.config import PipelineConfig
from synthflux.contracts import RowRecord, ShardMarker
from synthflux.errors import Rejected
from synthflux.images import preview
from synthflux.layout import DatasetPaths
from synthflux.sources import Source
from synthflux.storage import atomic_write

log = logging.getLogger("synthflux")

PREVIEWS_PER_CLASS = 4


def write_previews(
    prepared: DatasetPaths, infos: Iterable[ShardMarker], source: Source, cfg: PipelineConfig
) -> None:
    """A few images per class as the model sees them (images.preview), decoded again from the
    source files, which keeps memory flat: no shard is loaded whole."""
    prepared.previews.mkdir(exist_ok=True)
    written = set()
    for r in _preview_rows(infos, cfg.class_names):
        try:
            im = preview(source.paths.inside(r["file"]) or Path(), cfg.preprocess)
        except Rejected as e:  # the source changed since its shard was made: skip it
            log.warning("preprocess: no preview for %s: %s", r["file"], e)
            continue
        path = prepared.preview(r["class"], r["id"])
        with atomic_write(path) as f:
            im.save(f, format="PNG")
        written.add(path)
    for old in prepared.previews.glob("*.png"):  # of images no longer in the dataset
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
