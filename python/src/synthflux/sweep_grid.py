"""The sweep's grid: its `[sweep]` section, its points and their folder names, and which
settings a `vary` may name (what the sweep sets itself, whole sections, repeats are refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from synthflux.config import MAX_IMAGES, PipelineConfig
from synthflux.errors import ConfigError

Mix = Literal["synthetic", "real", "both"]
TRAINS_ON: dict[Mix, list[str]] = {
    "synthetic": ["synthetic"],
    "real": ["real"],
    "both": ["synthetic", "real"],
}


class SweepConfig(BaseModel):
    """The `[sweep]` section (only `synthflux sweep` reads it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    images: list[Annotated[int, Field(gt=0, le=MAX_IMAGES)]] = Field(
        default_factory=lambda: [10, 30, 100], min_length=1
    )  # synthetic images per class
    sources: list[Mix] = Field(default_factory=lambda: list(TRAINS_ON), min_length=1)
    # Settings by dotted name with the values to try, e.g. "train.lr" = [0.001, 0.003]: every
    # combination (times sources and images) is a point.
    vary: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)


@dataclass(frozen=True)
class Point:
    sources: Mix  # what the CNN learns from
    images: int  # synthetic images per class (0: real only)
    settings: tuple[tuple[str, Any], ...]  # the varied settings' values

    @property
    def name(self) -> str:
        """Its folder's name: readable, and unique for its exact settings (a name the
        sanitiser changed or cut gets a hash of the exact values)."""
        parts = [self.sources] + ([f"n{self.images}"] if self.images else [])
        values = [_shown(v) for _, v in self.settings]
        shown = "-".join(parts + [f"{k}={_shown(v)}" for k, v in self.settings])
        safe = re.sub(r"[^A-Za-z0-9._=,-]", "_", shown)
        # A value holding a separator ("-", "=") could read as two settings: hashed too.
        plain = not any(c in v for v in values for c in "-=")
        if safe == shown and plain and len(shown) <= 120:
            return shown
        exact = json.dumps([parts, self.settings])
        return f"{safe[:100]}-{hashlib.sha256(exact.encode()).hexdigest()[:12]}"


def _shown(value: Any) -> str:
    """A value in a point's name: a string as it is, unless it reads as another JSON value
    ("", "1", "true"), whose quotes the sanitiser then replaces (and a hash keeps apart)."""
    if isinstance(value, str) and value:
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, separators=(",", ":"))


# What the sweep sets for each point itself: a `vary` of it would be overwritten, and the
# table would claim a setting the point did not train with.
SET_BY_THE_SWEEP = {
    "data_root": "each point has its own data root",
    "images_per_class": "sweep.images sets it",
    "train.sources": "sweep.sources sets it",
    "train.baseline": "the sweep's real-only points are its baseline",
    "classes": "sweep.images sets every class's count",
}


# Settings that change only the synthetic images: a real-only CNN never sees them.
GENERATION_ONLY = ("generate", "finetune", "filter", "style", "negative_prompt", "pools")


def runs_as(point: Point) -> Point:
    """The point whose run stands for `point`: one real-only run serves every value of the
    generation settings (same data root, same config), rather than one run per value."""
    if point.sources != "real":
        return point
    kept = tuple((k, v) for k, v in point.settings if k.split(".")[0] not in GENERATION_ONLY)
    return dataclasses.replace(point, settings=kept)


def check_vary(grid: SweepConfig, path: Path) -> None:
    for key, values in grid.vary.items():
        if why := SET_BY_THE_SWEEP.get("classes" if key.startswith("classes") else key):
            raise ConfigError(f"{path}: sweep.vary.{key}: the sweep sets it for each point "
                              f"itself ({why}); vary something else")  # fmt: skip
        if key == "generate.devices":  # points of the same images, made twice
            raise ConfigError(f"{path}: sweep.vary.{key}: where images are made changes no "
                              "result; give it once (or `sweep --devices`)")  # fmt: skip
        if key in SECTIONS:  # a row would claim one setting while the whole table changed
            raise ConfigError(f"{path}: sweep.vary.{key}: a whole section; vary its settings "
                              f"by dotted name ({key}.<setting>)")  # fmt: skip
        seen = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(seen)) < len(seen):
            twice = next(v for v in seen if seen.count(v) > 1)
            raise ConfigError(f"{path}: sweep.vary.{key}: {twice} is listed twice (two "
                              "points of the same settings)")  # fmt: skip


# The config's sections ([generate], [train], ...): a vary names a setting inside one.
SECTIONS = {
    name for name, f in PipelineConfig.model_fields.items()
    if any(isinstance(t, type) and issubclass(t, BaseModel) for t in (f.annotation, *get_args(f.annotation)))
}  # fmt: skip
