"""Real images for tests: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10
classes, shipped inside the package, so nothing is downloaded), written out as ImageFolders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = [str(d) for d in range(10)]


def write_digits(root: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """root/train/<digit>/<n>.png and root/test/<digit>/<n>.png: a shuffled split, each image
    8x8 PNG in 8 bits (the dataset's 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_test = round(len(order) * test_fraction)
    for part, rows in (("test", order[:n_test]), ("train", order[n_test:])):
        for i in rows:
            folder = root / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root / "train", root / "test"


def digits_config(data: Path, **train: Any) -> dict[str, Any]:
    """A config for the digits: no prompts (real images only), 16x16 grayscale, trained with
    the PyTorch twin."""
    return {
        "data_root": str(data),
        "classes": [{"name": c} for c in CLASSES],
        "preprocess": {
            "width": 16,
            "height": 16,
            "shard_size": 256,
            "resample": "bilinear",
            "aspect": "stretch",
        },
        "train": {
            "sources": ["real"],
            "epochs": 30,
            "batch_size": 32,
            "lr": 0.003,
            "patience": 5,
            **train,
        },
        "cnn": {"backend": "reference"},
    }


def keep_classes(folders: tuple[Path, ...], names: list[str]) -> None:
    """Remove every class folder but `names` from each ImageFolder."""
    import shutil

    for folder in folders:
        for d in folder.iterdir():
            if d.name not in names:
                shutil.rmtree(d)
