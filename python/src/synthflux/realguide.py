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
from synthflux.sources import real_training_source, records_by_class

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
    paths = real_training_source(cfg, "generate.init_source", name, "images made from it")
    found = records_by_class(
        cfg, paths, "generate.init_source",
        "nothing to start from; import a folder with every class, or generate from text",
    )  # fmt: skip
    return {c: [Parent(name, r["id"], r["file"], str(r["sha256"])) for r in recs]
            for c, recs in found.items()}  # fmt: skip


def init_image(cfg: PipelineConfig, parent: Parent) -> Image.Image:
    """The parent as the pipeline's starting image: upright, RGB, centre-cropped to the output's
    aspect and resized to it."""
    from PIL import Image, ImageOps

    gen = cfg.generate
    path = cfg.layout.source(parent.source).image(parent.file)
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
    return ImageOps.fit(upright, (gen.width, gen.height), Image.Resampling.LANCZOS)
