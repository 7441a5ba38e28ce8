"""Real images anyone has: scikit-learn's handwritten digits (1,797 grayscale 8x8 images, 10
classes, shipped inside the package: nothing is downloaded), written out as ImageFolders for
`synthflux import` (`synthflux digits`: the demo's and the tests' real images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthflux.errors import ConfigError

CLASSES = [str(d) for d in range(10)]


def write_digits(root: Path, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """root/train/<digit>/<n>.png and root/test/<digit>/<n>.png: a shuffled split by `seed`,
    each image an 8x8 8-bit PNG (the dataset's 0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "the digits come with scikit-learn: pip install scikit-learn (make venv has it)"
        ) from None
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
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
