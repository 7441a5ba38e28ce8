"""The language-neutral rules of training (docs/training.md): one hash for every random choice.

Which images validate, in which order shards and images are visited each epoch, and how each
is augmented: all from `unit_hash`, a SHA-256 of the parts, so Julia (julia/src/train.jl) and
Python compute the same choices, and adding images never changes an old image's.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from synthflux.config import TrainConfig


@dataclass(frozen=True)
class TrainSettings:
    """What a trainer is told, the one spelling on the Python side: flux_model.jl reads them
    as `--name value` options (julia/src/cli.jl), the PyTorch twin as this object."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0
    flip: bool = False
    shift: int = 0

    @classmethod
    def of(cls, t: TrainConfig) -> TrainSettings:
        return cls(t.epochs, t.batch_size, t.lr, t.betas[0], t.betas[1], t.eps, t.weight_decay,
                   t.val_fraction, t.patience, t.seed, t.flip, t.shift)  # fmt: skip

    def options(self) -> tuple[str, ...]:
        """As flux_model.jl's options: --batch-size 32 ... (floats exact, flip as 0/1)."""
        out: list[str] = []
        for name, value in asdict(self).items():
            text = repr(value) if isinstance(value, float) else str(int(value))
            out += [f"--{name.replace('_', '-')}", text]
        return tuple(out)


def unit_hash(*parts: object) -> int:
    """The first 8 bytes, big-endian, of SHA-256 of the parts joined with ':'."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_validation(seed: int, source: str, image_id: int, fraction: float) -> bool:
    """An image validates when its hash, as a float in [0, 1), is below the fraction."""
    return (unit_hash(seed, "split", source, image_id) >> 11) / 2.0**53 < fraction


def validation_mask(seed: int, source: str, ids: np.ndarray, fraction: float) -> np.ndarray:
    return np.array([is_validation(seed, source, int(i), fraction) for i in ids], dtype=bool)


def shard_order(seed: int, epoch: int, shards: list[tuple[str, str]]) -> list[int]:
    """Positions of (source, shard file) pairs in the order epoch `epoch` visits them."""
    keys = [unit_hash(seed, "shard", epoch, s, f) for s, f in shards]
    return sorted(range(len(shards)), key=keys.__getitem__)


def image_order(seed: int, epoch: int, source: str, ids: np.ndarray) -> list[int]:
    """Positions of a shard's (training) images in the order epoch `epoch` visits them."""
    keys = [unit_hash(seed, "order", epoch, source, int(i)) for i in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def augmentation(
    seed: int, epoch: int, source: str, image_id: int, flip: bool, shift: int
) -> tuple[bool, int, int]:
    """(flipped, dx, dy) of one training image in one epoch."""
    h = unit_hash(seed, "augment", epoch, source, image_id)
    span = 2 * shift + 1
    return flip and bool(h & 1), (h >> 8) % span - shift, (h >> 24) % span - shift


def augment(chw: np.ndarray, flipped: bool, dx: int, dy: int) -> np.ndarray:
    """out[c, y, x] = in[c, clamp(y - dy), clamp(fx - dx)], fx = W-1-x if flipped, else x."""
    if not flipped and dx == 0 and dy == 0:
        return chw
    _, h, w = chw.shape
    xs = np.arange(w)
    fx = w - 1 - xs if flipped else xs
    cols = np.clip(fx - dx, 0, w - 1)
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    return chw[:, rows][:, :, cols]
