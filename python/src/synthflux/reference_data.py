"""The training data of the PyTorch twin (synthflux.reference_train), as docs/training.md says.

The shards of each input, each image's side of the validation split, and an epoch's batches:
shard order, image order and augmentation, the same as train.jl's data section. One shard's
images are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from synthflux.errors import DataError
from synthflux.layout import SHARD_PATTERN
from synthflux.trainplan import augment, augmentation, image_order, shard_order, validation_mask

if TYPE_CHECKING:
    from synthflux.reference_train import Settings


@dataclass
class Shard:
    source: str
    path: Path
    ids: np.ndarray
    labels: np.ndarray
    validation: np.ndarray  # bool per row


def read_shards(inputs: list[tuple[str, Path]], settings: Settings, n_classes: int) -> list[Shard]:
    """Every input's shards (ids, labels, the split; not the images), checked."""
    shards = []
    for source, folder in inputs:
        files = sorted(p for p in folder.glob("shard-*.npz") if SHARD_PATTERN.match(p.name))
        if not files:
            raise DataError(f"{folder}: no shard-*.npz files (input {source!r})")
        for path in files:
            with np.load(path, allow_pickle=False) as z:
                ids, labels = z["ids"].astype(np.int64), z["labels"].astype(np.int64)
            if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
                raise DataError(f"{path}: labels must be in 0..{n_classes - 1}")
            mask = validation_mask(settings.seed, source, ids, settings.val_fraction)
            shards.append(Shard(source, path, ids, labels, mask))
    if not any((~s.validation).any() for s in shards):
        raise DataError("no training images: every image is in the validation split")
    return shards


def nchw(path: Path) -> np.ndarray:
    """A shard's images as (N, C, H, W)."""
    with np.load(path, allow_pickle=False) as z:
        images: np.ndarray = z["images"]
    out: np.ndarray = images.T  # Fortran (W, H, C, N) -> C-order (N, C, H, W), no copy
    return out


def batches(
    shards: list[Shard], settings: Settings, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The epoch's batches (N, C, H, W), labels: shard order, image order, augmentation."""
    order = shard_order(settings.seed, epoch, [(s.source, s.path.name) for s in shards])
    images: list[np.ndarray] = []
    labels: list[int] = []
    for k in order:
        shard = shards[k]
        rows = np.flatnonzero(~shard.validation)
        if not len(rows):
            continue
        pixels = nchw(shard.path)
        for j in image_order(settings.seed, epoch, shard.source, shard.ids[rows]):
            row = int(rows[j])
            flipped, dx, dy = augmentation(settings.seed, epoch, shard.source,
                                           int(shard.ids[row]), settings.flip, settings.shift)  # fmt: skip
            images.append(augment(pixels[row], flipped, dx, dy))
            labels.append(int(shard.labels[row]))
            if len(images) == settings.batch_size:
                yield np.stack(images), np.array(labels, np.int64)
                images, labels = [], []
    if images:
        yield np.stack(images), np.array(labels, np.int64)
