"""Real images for tests: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10
classes, shipped inside the package, so nothing is downloaded), written out as ImageFolders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The writer is the package's (`synthflux digits`); the configs below are the tests'.
from synthflux.digits import CLASSES, write_digits

__all__ = ["CLASSES", "digits_config", "keep_classes", "write_digits"]


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
