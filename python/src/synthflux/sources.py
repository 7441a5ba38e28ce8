"""Where images come from: the synthetic set generate makes, and folders of real images
`synthflux import` brings in, each for training or for testing.

Every source has the same manifest record schema (records.ManifestRecord) and is preprocessed
the same way into preprocessed/<source>/; `[train] sources` picks which ones the CNN learns
from, and every imported test source is evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from synthflux.config import PipelineConfig
from synthflux.errors import ConfigError, DataError
from synthflux.layout import SYNTHETIC, DataLayout, SourcePaths
from synthflux.lineage import require_imported
from synthflux.storage import read_jsonl

Split = Literal["train", "test"]
SOURCE_FILE = "source.json"  # imported/<name>/source.json: the folder and its split


@dataclass(frozen=True)
class Source:
    name: str
    split: Split
    paths: SourcePaths

    @property
    def synthetic(self) -> bool:
        return self.name == SYNTHETIC


def imported(layout: DataLayout) -> list[Source]:
    """The imported sources, by name."""
    found = []
    for marker in sorted(layout.imported.glob(f"*/{SOURCE_FILE}")):
        name = marker.parent.name
        found.append(Source(name, imported_split(marker), layout.source(name)))
    return found


def imported_split(marker: Path) -> Split:
    """The split ("train" or "test") an imported source's source.json records."""
    try:
        split = json.loads(marker.read_text())["split"]
    except (OSError, ValueError, KeyError, TypeError):
        split = None
    if split not in ("train", "test"):
        raise DataError(f"{marker}: unreadable; import that folder again")
    return cast(Split, split)


def all_sources(cfg: PipelineConfig) -> list[Source]:
    """Every source of this data root: the synthetic one first (if the config makes it)."""
    layout = cfg.layout
    paths = layout.source(SYNTHETIC, filtered=cfg.filters)
    synthetic = [Source(SYNTHETIC, "train", paths)] if cfg.generates else []
    return synthetic + imported(layout)


def training_sources(cfg: PipelineConfig) -> list[Source]:
    """The sources `[train] sources` names; a clear error if one is asked for and absent."""
    chosen = [
        s
        for s in all_sources(cfg)
        if (s.synthetic and "synthetic" in cfg.train.sources)
        or (not s.synthetic and s.split == "train" and "real" in cfg.train.sources)
    ]
    if "real" in cfg.train.sources and not any(not s.synthetic for s in chosen):
        raise DataError(
            'train.sources has "real" but no folder was imported for training: run '
            "`synthflux import CONFIG FOLDER --as train`"
        )
    return chosen


def test_sources(cfg: PipelineConfig) -> list[Source]:
    return [s for s in all_sources(cfg) if s.split == "test"]


def real_training_source(cfg: PipelineConfig, setting: str, name: str, made: str) -> SourcePaths:
    """The imported training source a setting names (finetune.source, generate.init_source).
    One-line errors: none of that name, or a test set (`made` from it would carry test images
    into training)."""
    paths = cfg.layout.source(name)
    marker = paths.folder / SOURCE_FILE
    if not marker.is_file():
        named = "" if name == "train" else f" --name {name}"  # (train is the default name)
        raise DataError(f"{setting} = {name!r}: no source of that name was imported: run "
                        f"`synthflux import CONFIG FOLDER --as train{named}` first")  # fmt: skip
    if imported_split(marker) != "train":
        raise ConfigError(f"{setting} = {name!r} is a test set: {made} would carry the test "
                          "images into training; import real images --as train")  # fmt: skip
    require_imported(paths)
    return paths


def records_by_class(
    cfg: PipelineConfig, paths: SourcePaths, setting: str, every_class: str
) -> dict[str, list[dict[str, Any]]]:
    """Each class's records in a real training source, in id order; a class without images is
    a one-line error (`every_class` says what to do)."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in cfg.class_names}
    for rec in read_jsonl(paths.manifest):
        if rec.get("class") in found and rec.get("sha256"):
            found[rec["class"]].append(rec)
    for class_name, mine in found.items():
        if not mine:
            raise DataError(f"{setting} = {paths.name!r} has no images of class {class_name!r}: "
                            f"{every_class}")  # fmt: skip
        mine.sort(key=lambda r: r["id"])
    return found
