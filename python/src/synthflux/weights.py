"""The CNN's shape (`ArchSpec`) and its language-neutral weights file, `weights.npz`.

Python and Julia both read and write it (julia/README.md documents the layout): named float32
arrays in Flux's layout plus the Int64 vector `arch`, which says the shape. The default
network's numbers live here once for Python, as julia/src/arch.jl holds Julia's.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthflux.errors import DataError
from synthflux.storage import UNREADABLE, atomic_write

FORMAT_VERSION = 1
_ARCH_HEADER = 7  # format_version, W, H, C, K, kernel, n_blocks; then one entry per block
# The default CNN, here once for Python (julia/src/arch.jl has Julia's; a test checks both).
DEFAULT_KERNEL = 3
DEFAULT_BLOCKS = (8, 16)
DEFAULT_CLASSES = 2  # what flux_model.jl assumes when it must create weights itself


@dataclass(frozen=True)
class ArchSpec:
    """The network's shape, stored in weights.npz as the Int64 vector `arch`."""

    width: int
    height: int
    channels: int
    n_classes: int
    kernel: int
    block_channels: tuple[int, ...]

    def __post_init__(self) -> None:
        problems = []
        for name in ("width", "height", "channels", "n_classes", "kernel"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            problems.append(f"n_classes must be >= 2, got {self.n_classes}")
        if self.kernel % 2 == 0:
            # An odd kernel with pad k÷2 keeps W and H, so both frameworks agree on sizes.
            problems.append(f"kernel must be odd, got {self.kernel}")
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            problems.append(f"block channels must be >= 1 each, got {list(self.block_channels)}")
        if not problems:
            w, h, _ = self.feature_shape
            if w < 1 or h < 1:
                problems.append(
                    f"{self.width}x{self.height} is too small for "
                    f"{len(self.block_channels)} 2x2 pooling blocks"
                )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(W', H', C') after the conv blocks: each 2x2 max-pool halves W and H, rounding down."""
        n = len(self.block_channels)
        return self.width >> n, self.height >> n, self.block_channels[-1]

    @property
    def n_features(self) -> int:
        return math.prod(self.feature_shape)

    def to_array(self) -> np.ndarray:
        head = [FORMAT_VERSION, self.width, self.height, self.channels, self.n_classes]
        head += [self.kernel, len(self.block_channels)]
        return np.array(head + list(self.block_channels), dtype=np.int64)

    @classmethod
    def from_array(cls, arch: np.ndarray) -> ArchSpec:
        if arch.ndim != 1 or arch.dtype.kind not in "iu" or len(arch) < _ARCH_HEADER:
            raise ValueError(f"`arch` must be an integer vector, got {arch.dtype} {arch.shape}")
        version, w, h, c, k, kernel, n_blocks = (int(v) for v in arch[:_ARCH_HEADER])
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported weights format version {version}, expected 1")
        if len(arch) != _ARCH_HEADER + n_blocks:
            raise ValueError(f"`arch` says {n_blocks} blocks but has {len(arch)} entries")
        blocks = tuple(int(v) for v in arch[_ARCH_HEADER:])
        return cls(w, h, c, k, kernel, blocks)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every float32 array weights.npz must hold, by name, in Flux's layout."""
        shapes: dict[str, tuple[int, ...]] = {}
        cin = self.channels
        for i, cout in enumerate(self.block_channels, 1):
            shapes[f"conv{i}_weight"] = (self.kernel, self.kernel, cin, cout)
            shapes[f"conv{i}_bias"] = (cout,)
            cin = cout
        shapes["dense_weight"] = (self.n_classes, self.n_features)
        shapes["dense_bias"] = (self.n_classes,)
        return shapes


Weights = dict[str, np.ndarray]


def spec_of(weights: Mapping[str, np.ndarray]) -> ArchSpec:
    return ArchSpec.from_array(np.asarray(weights["arch"]))


def init_weights(
    width: int,
    height: int,
    channels: int,
    n_classes: int = 2,
    seed: int = 0,
    channels_per_block: Sequence[int] = DEFAULT_BLOCKS,
    kernel: int = DEFAULT_KERNEL,
) -> Weights:
    """Fresh weights, a pure function of the arguments (a private numpy Generator, no global RNG).

    Weights and biases are uniform in ±1/sqrt(fan_in), PyTorch's default for Conv2d and Linear.
    """
    spec = ArchSpec(width, height, channels, n_classes, kernel, tuple(channels_per_block))
    rng = np.random.default_rng(seed)
    shapes = spec.expected_shapes()
    fan_in = {
        f"conv{i}": kernel * kernel * cin
        for i, cin in enumerate((channels, *spec.block_channels[:-1]), 1)
    }
    fan_in["dense"] = spec.n_features
    weights: Weights = {"arch": spec.to_array()}
    for layer, fan in fan_in.items():
        bound = 1.0 / math.sqrt(fan)
        for part in ("weight", "bias"):
            name = f"{layer}_{part}"
            weights[name] = rng.uniform(-bound, bound, size=shapes[name]).astype(np.float32)
    return weights


def check_weights(weights: Mapping[str, np.ndarray], source: str = "weights") -> ArchSpec:
    """Raise DataError naming `source` unless `weights` is a complete, finite set for its `arch`."""
    if "arch" not in weights:
        raise DataError(f"{source}: no `arch` array (the architecture spec)")
    try:
        spec = spec_of(weights)
    except ValueError as e:
        raise DataError(f"{source}: bad `arch`: {e}") from None
    expected = spec.expected_shapes()
    unknown = sorted(set(weights) - set(expected) - {"arch"})
    if unknown:
        raise DataError(f"{source}: unexpected arrays {unknown}")
    for name, shape in expected.items():
        if name not in weights:
            raise DataError(f"{source}: missing array `{name}`")
        a = weights[name]
        if a.dtype != np.float32 or a.shape != shape:
            raise DataError(
                f"{source}: `{name}` must be float32 {shape} for this arch, got {a.dtype} {a.shape}"
            )
        if not np.isfinite(a).all():
            raise DataError(f"{source}: `{name}` holds NaN or Inf")
    return spec


def save_weights(path: Path, weights: Mapping[str, np.ndarray]) -> None:
    """Write weights.npz atomically. Arrays are stored Fortran-order, as Julia holds them."""
    check_weights(weights, str(path))
    arrays = {k: np.asfortranarray(v) for k, v in weights.items()}
    with atomic_write(Path(path)) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types the kwargs badly


def load_weights(path: Path) -> Weights:
    try:
        with np.load(path, allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
    except UNREADABLE as e:
        raise DataError(f"{path}: cannot read weights ({e})") from None
    check_weights(weights, str(path))
    return weights


CHECKPOINT_ARRAYS = ("arch", "state", "history", "best_val_loss")  # besides the parameters'


def checkpoint_problem(path: Path) -> str | None:
    """Why a trainer's checkpoint.npz is damaged (truncated, empty, not an npz, an array
    missing), or None. Every array is read, so a damaged zip member is found too."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (*UNREADABLE, zlib.error) as e:  # truncated, empty, garbage, a bad member
        return f"{type(e).__name__}: {e}"
    missing = [k for k in CHECKPOINT_ARRAYS if k not in arrays]
    if missing:
        return f"no {', '.join(missing)} in it"
    return None
