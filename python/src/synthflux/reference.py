"""The PyTorch twin of the Flux CNN in `julia/src/model.jl`.

It reads the same `weights.npz` and shards and writes the same `.probs.npz`, so the golden
files under `tests/fixtures/golden/` pin both languages to one set of numbers, and tests and
tools can use it where no Julia is installed.

Weights are stored in Flux's layout (synthflux.weights, `julia/README.md`); the three conventions that differ
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from synthflux.contracts import read_shard
from synthflux.layout import probs_file
from synthflux.storage import atomic_write
from synthflux.weights import check_weights, load_weights, spec_of

if TYPE_CHECKING:
    import torch
    from torch import nn


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
        # Flip, to OIHW; a real copy: ascontiguousarray keeps negative strides when the flipped
        # axes have length 1 (a 1x1 kernel), which torch refuses.
        torch_w = np.array(w[::-1, ::-1].transpose(3, 2, 1, 0), order="C", copy=True)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(torch_w))
            conv.bias.copy_(torch.from_numpy(weights[f"conv{i}_bias"]))  # type: ignore[union-attr]
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
    return _in_batches(lambda x: torch.softmax(model(x), dim=1), images, batch_size,
                       spec_of(weights).n_classes)  # fmt: skip


def features(
    weights: Mapping[str, np.ndarray],
    images: np.ndarray,
    batch_size: int = 256,
    model: nn.Sequential | None = None,
) -> np.ndarray:
    """The penultimate features (N, C') float32 of a shard's (W, H, C, N) `images`: the last
    conv block's output (after its ReLU and 2x2 max-pool) averaged over space, one value per
    channel, as Inception's pool3 is (synthflux.distribution compares sources with them)."""
    model = model if model is not None else build_model(weights)
    trunk = model[:-2]  # without Flatten and the Dense layer
    return _in_batches(lambda x: trunk(x).mean(dim=(2, 3)), images, batch_size,
                       spec_of(weights).block_channels[-1])  # fmt: skip


def _in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int, width: int
) -> np.ndarray:
    """`fn` over NCHW batches of a shard's (W, H, C, N) images: the rows (N, width) float32."""
    import torch

    nchw = np.ascontiguousarray(images.T, dtype=np.float32)  # no copy for a Fortran-order shard
    with torch.inference_mode():
        out = [fn(torch.from_numpy(nchw[start : start + batch_size])).numpy()
               for start in range(0, len(nchw), batch_size)]  # fmt: skip
    if not out:
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def predict_shard(shard_path: Path, weights: Mapping[str, np.ndarray], out_dir: Path) -> Path:
    """Write `out_dir/<shard>.probs.npz` (probs (N, K) float32, ids int64) as Julia does."""
    spec = check_weights(weights, "weights")
    images, _, ids = read_shard(Path(shard_path), (spec.width, spec.height, spec.channels))
    probs = predict(weights, images)
    out = Path(out_dir) / probs_file(Path(shard_path).name)
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
