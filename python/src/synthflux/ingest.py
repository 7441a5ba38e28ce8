"""`synthflux import`: a folder of real images (an ImageFolder) becomes a source in the data root.

    FOLDER/<class>/<any depth>/<image>   ->   DATA/imported/<name>/<class>/<same path>

The files are copied (the originals are never modified), with a manifest record of the same
schema as generated images (source "real", the original path, sha256), so preprocess treats
them alike, bad files included. A re-import of an unchanged folder does nothing; a changed or
new file is read again, a removed one is removed. The class folders must be the config's
classes; each image's id is a hash of its class and path, so adding images never renames one
(and never moves one between the training and validation splits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from PIL import Image

from synthflux.config import SAFE_NAME, PipelineConfig
from synthflux.errors import DataError
from synthflux.layout import SYNTHETIC, DataLayout, SourcePaths
from synthflux.progress import Progress, plural
from synthflux.records import ManifestRecord, iter_records
from synthflux.sources import SOURCE_FILE, Split, imported_split
from synthflux.stages import write_stage_marker
from synthflux.storage import (
    atomic_write,
    remove_stale_temps,
    sha256_file,
    write_json_atomic,
    write_jsonl_atomic,
)

log = logging.getLogger("synthflux")


@dataclass
class ImportSummary:
    name: str
    split: str
    folder: Path
    images: int = 0
    copied: int = 0
    unchanged: int = 0
    removed: int = 0
    ignored: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = True

    def lines(self) -> list[str]:
        out = [
            f"{self.name} ({self.split}) from {self.folder}: {plural(self.images, 'image')} "
            f"({self.copied} new or changed, {self.unchanged} unchanged, {self.removed} removed) "
            f"in {self.seconds:.1f}s",
            f"per class {self.per_class}",
        ]
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (" ..." if len(self.ignored) > 5 else "")
            out.append(f"ignored {plural(len(self.ignored), 'file')}: {shown}")
        return out


def run(
    cfg: PipelineConfig,
    folder: Path,
    *,
    split: Split,
    name: str | None = None,
    classes_subset: bool = False,
) -> ImportSummary:
    """Bring `folder` in as source `name` (default: the split), for training or testing."""
    start = time.monotonic()
    name = name or split
    layout = cfg.layout
    source = layout.source(name)
    _check_name(layout, name, split, folder)
    # 1. what the folder holds, checked against the config's classes
    files, ignored = _scan(folder, cfg.class_names, classes_subset)
    summary = ImportSummary(name, split, folder.resolve(), ignored=ignored)
    # 2. copy what is new or changed; keep what is unchanged; remove what is gone
    source.folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(source.folder)
    previous = {r["file"]: r for r in _previous_records(source)}
    records = _copy(cfg, source, files, previous, summary)
    _remove_gone(source, {r["file"] for r in records}, summary)
    # 3. the manifest, the source's description, and the done marker last
    write_jsonl_atomic(source.manifest, records)  # type: ignore[arg-type]
    write_json_atomic(
        source.folder / SOURCE_FILE,
        {"name": name, "split": split, "folder": str(folder.resolve()), "classes": cfg.class_names},
    )
    summary.images = len(records)
    summary.per_class = {c: sum(r["class"] == c for r in records) for c in cfg.class_names}
    summary.seconds = time.monotonic() - start
    write_stage_marker(
        source.marker, "import", key=_listing_key(files), seconds=summary.seconds,
        complete=True, facts={"images": len(records),
                              "manifest_sha256": sha256_file(source.manifest)},
    )  # fmt: skip
    return summary


def _imported_from(described: Path) -> Path | None:
    try:
        return Path(json.loads(described.read_text(encoding="utf-8"))["folder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_name(layout: DataLayout, name: str, split: Split, folder: Path) -> None:
    if name == SYNTHETIC or not SAFE_NAME.match(name) or ".." in name:
        raise DataError(
            f"--name {name!r}: must be letters, digits, '-', '_' or '.' (it names a folder), "
            f"and not {SYNTHETIC!r} (the generated images' name)"
        )
    if split == "test" and name in ("train", "validation"):
        raise DataError(f"--name {name!r}: a test set cannot be called like a split; pick another")
    described = layout.source(name).folder / SOURCE_FILE
    if described.is_file():
        before = imported_split(described)
        if before != split:
            raise DataError(
                f"source {name!r} was imported --as {before}: give this one another --name"
            )
        was = _imported_from(described)
        if was is not None and was != folder.resolve():  # another folder: never replace it
            raise DataError(
                f"source {name!r} was imported from {was}: give this folder its own --name "
                f"(or remove {layout.source(name).folder} to replace that source)"
            )


# Pillow's own list: any format it reads.
IMAGE_EXTENSIONS = frozenset(Image.registered_extensions())


def _require_readable(folder: Path) -> None:
    """A folder that cannot be listed would import as no images and remove the earlier
    copies: refuse first, before anything is changed."""
    errors: list[OSError] = []
    for _ in os.walk(folder, onerror=errors.append):
        pass
    if errors:
        e = errors[0]
        raise DataError(
            f"{e.filename or folder}: cannot be read ({e.strerror or e}): nothing was imported "
            "or removed"
        )


def _scan(
    folder: Path, classes: list[str], subset: bool
) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """(class, file, path below the class folder) for every image, and what was ignored."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (an ImageFolder: FOLDER/<class>/<images>)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra, missing = set(found) - set(classes), [c for c in classes if c not in found]
    if extra or (missing and not subset):
        raise DataError(
            f"{folder}: its class folders {found} do not match the config's classes {classes}"
            + (f"; not classes: {sorted(extra)}" if extra else "")
            + (f"; no folder: {missing} (or import with --classes-subset)" if missing else "")
        )
    files, ignored = [], []
    for c in classes:
        if c not in found:
            continue
        _require_readable(folder / c)
        for path in sorted((folder / c).rglob("*")):
            rel = path.relative_to(folder / c)
            if any(part.startswith(".") for part in rel.parts):
                continue
            shown = os.fsencode(f"{c}/{rel.as_posix()}").decode("utf-8", "backslashreplace")
            if path.is_symlink() and not path.is_file():  # rglob does not follow them
                what = "a link to a folder: not followed" if path.is_dir() else "a broken link"
                ignored.append(f"{shown} ({what})")
                continue
            if not path.is_file():
                continue
            if shown != f"{c}/{rel.as_posix()}":  # undecodable bytes: no id, no JSON, no CSV
                ignored.append(f"{shown} (its name is not UTF-8: rename it)")
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(f"{shown} (not an image)")
                continue
            files.append((c, path, rel.as_posix()))
    if not files:
        raise DataError(f"{folder}: no images in its class folders")
    return files, ignored


def image_id(class_name: str, rel: str) -> int:
    """A 63-bit id from the image's class and path: stable as the folder grows."""
    digest = hashlib.sha256(f"{class_name}/{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _previous_records(source: SourcePaths) -> list[ManifestRecord]:
    return list(iter_records(source.manifest, "")) if source.manifest.is_file() else []


def _copy(
    cfg: PipelineConfig,
    source: SourcePaths,
    files: list[tuple[str, Path, str]],
    previous: dict[str, Any],
    summary: ImportSummary,
) -> list[ManifestRecord]:
    records: list[ManifestRecord] = []
    index = dict.fromkeys(cfg.class_names, 0)
    seen: dict[int, str] = {}
    with Progress("import", len(files)) as progress:
        for class_name, path, rel in files:
            file = f"{class_name}/{rel}"
            st = path.stat()
            old = previous.get(file)
            if old and old.get("original_size") == st.st_size and old.get(
                "original_mtime_ns") == st.st_mtime_ns and source.image(file).is_file():  # fmt: skip
                rec = dict(old)
                summary.unchanged += 1
            else:
                rec = {"sha256": _copy_file(path, source.image(file))}
                summary.copied += 1
            image = image_id(class_name, rel)
            if image in seen:  # 1 in 2^63: never, but then say so rather than mix images up
                raise DataError(f"{path} and {seen[image]} share an image id: rename one")
            seen[image] = file
            rec |= {"id": image, "name": file, "class": class_name,
                    "label": cfg.class_names.index(class_name), "index": index[class_name],
                    "file": file, "source": "real", "original": str(path.resolve()),
                    "original_size": st.st_size, "original_mtime_ns": st.st_mtime_ns,
                    "status": "ok"}  # fmt: skip
            index[class_name] += 1
            records.append(cast(ManifestRecord, rec))
            progress.update()
    return records


def _copy_file(src: Path, dest: Path) -> str:
    """Copy atomically (the original is only read); return the copy's sha256."""
    h = hashlib.sha256()
    with open(src, "rb") as f, atomic_write(dest, "wb", durable=False) as out:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def _remove_gone(source: SourcePaths, kept: set[str], summary: ImportSummary) -> None:
    """Copies of files no longer in the folder, and the folders they leave empty."""
    for path in sorted(source.folder.rglob("*"), reverse=True):
        rel = path.relative_to(source.folder).as_posix()
        if path.is_file() and "/" in rel and rel not in kept and not path.name.startswith("."):
            path.unlink()
            summary.removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _listing_key(files: list[tuple[str, Path, str]]) -> str:
    h = hashlib.sha256()
    for class_name, path, rel in files:
        st = path.stat()
        h.update(f"{class_name}/{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
