"""Real-guided generation: images that start from real ones ([generate] init_source).

Each generated image of a class starts from one of the class's real images in an imported
training source (img2img: the real image, noised by `strength`, then denoised towards the
prompt): image i of a class from its real image i mod R, the real images in id order, so the
first N images of a class are those a run of N makes. Each record names its parent (source,
id, file, sha256): a changed real image is a changed plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synthflux.config import PipelineConfig
from synthflux.errors import ConfigError, DataError
from synthflux.lineage import require_imported
from synthflux.sources import SOURCE_FILE, imported_split
from synthflux.storage import read_jsonl

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True, slots=True)
class Parent:
    """The real image a generated one starts from."""

    source: str
    id: int
    file: str
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "id": self.id, "file": self.file, "sha256": self.sha256}


def parents(cfg: PipelineConfig) -> dict[str, list[Parent]] | None:
    """Each class's real images to start from, in id order; None when generating from text."""
    name = cfg.generate.init_source
    if not name:
        return None
    paths = cfg.layout.source(name)
    marker = paths.folder / SOURCE_FILE
    if not marker.is_file():
        raise DataError(
            f"generate.init_source = {name!r}: no source of that name was imported: run "
            f"`synthflux import CONFIG FOLDER --as train --name {name}`"
        )
    if imported_split(marker) != "train":
        raise ConfigError(
            f"generate.init_source = {name!r} is a test set: images made from it would carry "
            "the test images into training; import real images --as train to guide with"
        )
    require_imported(paths)
    found: dict[str, list[Parent]] = {c: [] for c in cfg.class_names}
    for rec in read_jsonl(paths.manifest):
        if rec.get("class") in found and rec.get("sha256"):
            found[rec["class"]].append(Parent(name, rec["id"], rec["file"], str(rec["sha256"])))
    for class_name, mine in found.items():
        if not mine:
            raise DataError(
                f"generate.init_source = {name!r} has no images of class {class_name!r} to "
                "start from: import a folder with every class, or generate from text"
            )
        mine.sort(key=lambda p: p.id)
    return found


def init_image(cfg: PipelineConfig, parent: Parent) -> Image.Image:
    """The parent as the pipeline's starting image: upright, RGB, centre-cropped to the output's
    aspect and resized to it."""
    from PIL import Image, ImageOps

    gen = cfg.generate
    path = cfg.layout.source(parent.source).image(parent.file)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
    return ImageOps.fit(upright, (gen.width, gen.height), Image.Resampling.LANCZOS)
