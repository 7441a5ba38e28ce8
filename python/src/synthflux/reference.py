"""The PyTorch twin of the Flux CNN in `julia/src/SynthFluxModel.jl`.

It reads the same `weights.npz` and shards and writes the same `.probs.npz`, so the golden
files under `tests/fixtures/golden/` pin both languages to one set of numbers, and tests and
tools can use it where no Julia is installed.

Weights are stored in Flux's layout (see `julia/README.md`); the three conventions that differ
from PyTorch are handled in `build_model`:

* Flux's `Conv` is a true convolution (it flips the kernel in both spatial dims), PyTorch's
  `Conv2d` is a cross-correlation: the torch kernel is the Flux kernel flipped.
* Flux keeps conv kernels as (kw, kh, cin, cout) and images as WHCN; torch wants
  (cout, cin, kh, kw) and NCHW. A shard's Fortran-order (W, H, C, N) `images` array *is* a
  C-order NCHW batch once transposed (`images.T`), no copy.
* Flux flattens (W', H', C', N) column-major, which visits the same elements in the same order
  as torch flattening (N, C', H', W') row-major, so the Dense matrix (K, features) is shared as is.
"""

from __future__ import annotations

import argparse
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from synthflux.errors import DataError
from synthflux.storage import atomic_write

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 1
_ARCH_HEADER = 7  # format_version, W, H, C, K, kernel, n_blocks; then one entry per block
# What np.load raises for a missing, truncated or non-npz file.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)


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
    channels_per_block: Sequence[int] = (8, 16),
    kernel: int = 3,
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
        np.savez(f, **arrays)


def load_weights(path: Path) -> Weights:
    try:
        with np.load(path, allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
    except _UNREADABLE as e:
        raise DataError(f"{path}: cannot read weights ({e})") from None
    check_weights(weights, str(path))
    return weights


def build_model(weights: Mapping[str, np.ndarray]) -> nn.Sequential:
    """A torch.nn.Sequential computing the Flux Chain's logits, NCHW in, (N, K) out."""
    import torch
    from torch import nn

    spec = check_weights(weights)
    layers: list[nn.Module] = []
    cin = spec.channels
    for i, cout in enumerate(spec.block_channels, 1):
        conv = nn.Conv2d(cin, cout, spec.kernel, padding=spec.kernel // 2)
        w = weights[f"conv{i}_weight"]  # Flux: (kw, kh, cin, cout), a true convolution
        torch_w = np.ascontiguousarray(w[::-1, ::-1].transpose(3, 2, 1, 0))  # flip, to OIHW
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(torch_w))
            conv.bias.copy_(torch.from_numpy(weights[f"conv{i}_bias"]))
        layers += [conv, nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    dense = nn.Linear(spec.n_features, spec.n_classes)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights["dense_weight"])))
        dense.bias.copy_(torch.from_numpy(weights["dense_bias"]))
    layers += [nn.Flatten(), dense]
    return nn.Sequential(*layers).eval()


def predict(
    weights: Mapping[str, np.ndarray],
    images: np.ndarray,
    batch_size: int = 256,
    model: nn.Module | None = None,
) -> np.ndarray:
    """Class probabilities (N, K) float32 for a shard's (W, H, C, N) `images` array."""
    import torch

    model = model if model is not None else build_model(weights)
    nchw = np.ascontiguousarray(images.T, dtype=np.float32)  # no copy for a Fortran-order shard
    out = []
    with torch.inference_mode():
        for start in range(0, len(nchw), batch_size):
            logits = model(torch.from_numpy(nchw[start : start + batch_size]))
            out.append(torch.softmax(logits, dim=1).numpy())
    if not out:
        return np.zeros((0, spec_of(weights).n_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def read_shard(path: Path, spec: ArchSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, ids) of a shard, checked as the Julia side checks it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "ids") if k in z.files}
    except _UNREADABLE as e:
        raise DataError(f"{path}: not a readable .npz shard ({e})") from None
    for name in ("images", "labels", "ids"):
        if name not in arrays:
            raise DataError(f"{path}: missing array `{name}`")
    images, labels, ids = arrays["images"], arrays["labels"], arrays["ids"]
    if images.dtype != np.float32 or images.ndim != 4:
        raise DataError(
            f"{path}: `images` must be float32 (W, H, C, N), got {images.dtype} {images.shape}"
        )
    n = images.shape[3]
    for name, a in (("labels", labels), ("ids", ids)):
        if a.dtype != np.int64 or a.shape != (n,):
            raise DataError(f"{path}: `{name}` must be int64 ({n},), got {a.dtype} {a.shape}")
    if spec is not None and images.shape[:3] != (spec.width, spec.height, spec.channels):
        raise DataError(
            f"{path}: images are (W, H, C) = {images.shape[:3]} but the weights expect "
            f"{(spec.width, spec.height, spec.channels)}"
        )
    if not np.isfinite(images).all():
        raise DataError(f"{path}: `images` holds NaN or Inf")
    return images, ids


def probs_path(shard_path: Path, out_dir: Path) -> Path:
    """shard-00003.npz -> out_dir/shard-00003.probs.npz, the name Julia writes."""
    return Path(out_dir) / (Path(shard_path).name.removesuffix(".npz") + ".probs.npz")


def predict_shard(shard_path: Path, weights: Mapping[str, np.ndarray], out_dir: Path) -> Path:
    """Write `out_dir/<shard>.probs.npz` (probs (N, K) float32, ids int64) as Julia does."""
    spec = check_weights(weights, "weights")
    images, ids = read_shard(Path(shard_path), spec)
    probs = predict(weights, images)
    out = probs_path(shard_path, out_dir)
    with atomic_write(out) as f:
        np.savez(f, probs=probs, ids=ids)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m synthflux.reference --input SHARD... --weights W --output DIR`."""
    parser = argparse.ArgumentParser(prog="python -m synthflux.reference", description=main.__doc__)
    parser.add_argument("--input", nargs="+", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    weights = load_weights(args.weights)
    shards = []
    for p in args.input:
        shards += sorted(p.glob("shard-*.npz")) if p.is_dir() else [p]
    for shard in shards:
        print(predict_shard(shard, weights, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
