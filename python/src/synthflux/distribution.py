"""How close a training source's images are to a real test set's, on the trained CNN's features.

Pure functions over (N, D) feature arrays (synthflux.reference.features: the last conv block's
output, averaged over space): the Fréchet distance, KID, precision/recall/density/coverage,
diversity and duplicates; `section` puts them together, per class and overall, for evaluate.

These are computed on this project's own small CNN, not on Inception-v3: the numbers compare
sources of one run with each other (synthetic vs real, real vs real), never with published
FID/KID. A metric a set is too small for is None ("n/a (too few images)"), never NaN.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

VERSION = 1  # in evaluate's key: a change to what is computed here makes evaluations stale
K_NEAREST = 5  # PRDC's k (Naeem et al. 2020 use 5)
KID_SUBSETS = 100  # KID: the mean over this many random subsets (Bińkowski et al. 2018)
KID_SUBSET_SIZE = 1000  # of at most this many images from each set
PRDC_MAX_IMAGES = 5000  # PRDC is O(n²): larger sets are a seeded random subset of this size
DUPLICATE_FRACTION = 0.01  # a twin lies closer than 1 % of the class's RMS pairwise distance
SEED = 0  # every random choice here is drawn from a generator seeded with this
CHUNK = 1024  # rows of a distance matrix held at once
FEATURES = (
    "the trained CNN's last conv block output (after its ReLU and 2x2 max-pool), averaged over "
    "space: one value per channel of the last block (computed with the PyTorch twin)"
)
NOTE = (
    "computed on this project's own CNN features, not Inception-v3's: compare sources of this "
    "run with each other; NOT comparable with published FID/KID"
)
TOO_FEW = (
    f"n/a = too few images: FD, KID and diversity need 2 in each set, PRDC more than k={K_NEAREST}"
)


def shown(value: float | None, spec: str) -> str:
    """A metric for a table: formatted by `spec`, or "n/a" where the set was too small."""
    return "n/a" if value is None else format(value, spec)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float | None:
    """||mu_x - mu_y||² + Tr(S_x + S_y - 2 (S_x S_y)^½) between Gaussians fitted to x and y
    (Heusel et al. 2017, as their TTUR code computes it); None for fewer than 2 rows."""
    if len(x) < 2 or len(y) < 2:
        return None
    x, y = x.astype(np.float64), y.astype(np.float64)
    mu = x.mean(axis=0) - y.mean(axis=0)
    sx, sy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # singular: fewer images than features, or a dead channel
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sx @ sy)
        if not np.isfinite(root).all():  # nudge the diagonals, as TTUR's code does
            eps = np.eye(len(sx)) * 1e-6
            root = scipy.linalg.sqrtm((sx + eps) @ (sy + eps))
    fd = mu @ mu + np.trace(sx) + np.trace(sy) - 2 * np.trace(np.real(root))
    return max(float(fd), 0.0)  # rounding can leave a tiny negative for identical sets


def kid(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = SEED,
) -> float | None:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the kernel
    k(a, b) = (a·b/d + 1)³, averaged over `subsets` pairs of random subsets of m = min(n_x,
    n_y, subset_size) rows drawn without replacement; None for fewer than 2 rows."""
    m = min(len(x), len(y), subset_size)
    if m < 2:
        return None
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (_cubic(p, q, d) for p, q in ((a, a), (b, b), (a, b)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2 * kxy.mean()
    return total / subsets


def _cubic(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """The kernel matrix (a·b/d + 1)³, in place (4x faster than `** 3`)."""
    k = a @ b.T
    k /= d
    k += 1
    cube: np.ndarray = k * k
    cube *= k
    return cube


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's distance to its k-th nearest other row (the row itself is the 0th)."""
    out = np.empty(len(x))
    for start in range(0, len(x), CHUNK):
        d = cdist(x[start : start + CHUNK], x)
        out[start : start + CHUNK] = np.partition(d, k, axis=1)[:, k]
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = K_NEAREST) -> dict[str, float] | None:
    """Precision, recall, density and coverage (Naeem et al. 2020, as their reference code
    computes them, with k-NN balls; a row distance matrix at a time); None unless each set has
    more than k rows. Sets over PRDC_MAX_IMAGES are a seeded random subset of that size."""
    if len(real) <= k or len(fake) <= k:
        return None
    real, fake = _subset(real.astype(np.float64)), _subset(fake.astype(np.float64))
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    precise = np.zeros(len(fake), bool)  # inside some real ball
    density = np.zeros(len(fake))  # how many real balls it is inside
    recalled = np.zeros(len(real), bool)  # inside some fake ball
    nearest = np.full(len(real), np.inf)  # distance to the nearest fake row
    for start in range(0, len(fake), CHUNK):
        d = cdist(fake[start : start + CHUNK], real)  # (chunk, n_real)
        inside = d < r_real[None, :]
        precise[start : start + CHUNK] = inside.any(axis=1)
        density[start : start + CHUNK] = inside.sum(axis=1)
        recalled |= (d < r_fake[start : start + CHUNK, None]).any(axis=0)
        nearest = np.minimum(nearest, d.min(axis=0))
    return {
        "precision": float(precise.mean()),
        "recall": float(recalled.mean()),
        "density": float(density.mean() / k),
        "coverage": float((nearest < r_real).mean()),
    }


def _subset(x: np.ndarray, limit: int = PRDC_MAX_IMAGES) -> np.ndarray:
    if len(x) <= limit:
        return x
    rows = np.sort(np.random.default_rng(SEED).choice(len(x), limit, replace=False))
    return x[rows]


def spread(x: np.ndarray) -> float | None:
    """The root mean square distance between two different rows, exactly: sqrt(2 Tr S) with
    the unbiased covariance S (no pairs enumerated); None for fewer than 2 rows."""
    if len(x) < 2:
        return None
    return float(np.sqrt(2 * x.astype(np.float64).var(axis=0, ddof=1).sum()))


def duplicates(x: np.ndarray, fraction: float = DUPLICATE_FRACTION) -> np.ndarray:
    """Per row: has it a near-identical twin, another row closer than `fraction` of the set's
    RMS pairwise distance (identical rows always count, even in a set of identical rows)?"""
    if len(x) < 2:
        return np.zeros(len(x), bool)
    x = x.astype(np.float64)
    threshold = fraction * (spread(x) or 0.0)
    nearest, _ = cKDTree(x).query(x, k=2)  # itself and its nearest other row
    twin: np.ndarray = nearest[:, 1] <= threshold
    return twin


def compare(train: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Every metric between one training set and one test set (None: too few images)."""
    p = prdc(test, train)
    s_train, s_test = spread(train), spread(test)
    diversity = s_train / s_test if s_train is not None and s_test else None
    return {
        "images": {"train": len(train), "test": len(test)},
        "fd": frechet_distance(train, test),
        "kid": kid(train, test),
        **(p or dict.fromkeys(("precision", "recall", "density", "coverage"))),
        "diversity": diversity,
    }


def _by_class(
    features: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, np.ndarray]:
    return {c: features[labels == i] for i, c in enumerate(classes)}


def compare_sets(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: list[str]
) -> dict[str, Any]:
    """`compare` over all images and per class; (features, labels) each. The overall
    diversity is the mean of the classes' (a whole set's spread is mostly between classes)."""
    a, b = _by_class(*train, classes), _by_class(*test, classes)
    per_class = {c: compare(a[c], b[c]) for c in classes if len(b[c])}
    overall = compare(train[0], test[0])
    ratios = [m["diversity"] for m in per_class.values() if m["diversity"] is not None]
    overall["diversity"] = float(np.mean(ratios)) if ratios else None
    return {"overall": overall, "per_class": per_class}


def duplicate_rates(features: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The fraction of a source's images with a near-identical twin of their own class."""
    groups = _by_class(features, labels, classes)
    twins = {c: int(duplicates(x).sum()) for c, x in groups.items()}
    rate = lambda n, total: n / total if total else None  # noqa: E731
    return {
        "images": len(labels),
        "duplicates": sum(twins.values()),
        "rate": rate(sum(twins.values()), len(labels)),
        "per_class": {c: {"images": len(groups[c]), "duplicates": twins[c],
                          "rate": rate(twins[c], len(groups[c]))} for c in classes},
    }  # fmt: skip


def section(
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    train: list[str],
    test: list[str],
    classes: list[str],
) -> dict[str, Any]:
    """evaluate's "distribution": every training source against every test set, and each
    source's duplicates; `features` maps each source to its (features, labels)."""
    return {
        "features": FEATURES,
        "note": NOTE,
        "n/a": TOO_FEW,
        "k": K_NEAREST,
        "duplicate_rule": f"another image of the same class and source closer than "
        f"{DUPLICATE_FRACTION:g} x the class's RMS pairwise feature distance",
        "sources": {name: duplicate_rates(*features[name], classes) for name in train + test},
        "comparisons": [
            {"train": a, "test": b, **compare_sets(features[a], features[b], classes)}
            for a in train
            for b in test
        ],
    }


def relative_to_real(d: dict[str, Any]) -> list[str]:
    """Each source's FD on a test set as a multiple of the real training images' on it: real
    against real is the best a source can be (1.0x), so the numbers read as a distance."""
    ref = d.get("reference")
    base = {c["test"]: c["overall"]["fd"] for c in d["comparisons"] if c["train"] == ref}
    out = []
    for c in d["comparisons"]:
        fd, real_fd = c["overall"]["fd"], base.get(c["test"])
        if c["train"] != ref and fd is not None and real_fd:
            out.append(f"{c['train']} vs {c['test']}: FD {fd / real_fd:.1f}x the real training "
                       f"images' ({ref} vs {c['test']}: {real_fd:.3g}; 1x is as close as real)")  # fmt: skip
    return out
