"""Flux's forward pass in float64 numpy, written from NNlib's definitions, in WHCN.

It shares nothing with the torch model: if the flip or a layout conversion in
`synthflux.reference.build_model` were wrong, the two would disagree. The golden files'
expected probabilities are computed with it (tests/fixtures/golden/make_golden.py), so both
languages are measured against float64, not against each other.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from synthflux.weights import spec_of


def flux_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NNlib's conv (a true convolution) of x (W, H, Cin, N) with w (k, k, Cin, Cout), pad k÷2."""
    k = w.shape[0]
    p = k // 2
    width, height = x.shape[:2]
    xp = np.pad(x, ((p, p), (p, p), (0, 0), (0, 0)))
    out = np.zeros((width, height, w.shape[3], x.shape[3]))
    for i in range(k):
        for j in range(k):
            # out[x, y] = sum_ij w[i, j] * in[x + p - i, y + p - j]: the kernel runs backwards.
            patch = xp[k - 1 - i : k - 1 - i + width, k - 1 - j : k - 1 - j + height]
            out += np.einsum("xycn,cd->xydn", patch, w[i, j])
    return out + b[None, None, :, None]


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    w, h, c, n = x.shape
    x = x[: 2 * (w // 2), : 2 * (h // 2)]
    return x.reshape(w // 2, 2, h // 2, 2, c, n).max(axis=(1, 3))


def numpy_forward(weights: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, K), float64."""
    spec = spec_of(weights)
    x = images.astype(np.float64)
    for i in range(1, len(spec.block_channels) + 1):
        x = flux_conv(x, weights[f"conv{i}_weight"].astype(np.float64), weights[f"conv{i}_bias"])
        x = max_pool_2x2(np.maximum(x, 0))
    features = x.reshape(-1, x.shape[3], order="F")  # Julia's reshape(x, :, N): column-major
    logits = weights["dense_weight"].astype(np.float64) @ features + weights["dense_bias"][:, None]
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).T
