"""The pictures, with matplotlib: learning curves, confusion matrices, the sweep's curves.

Figures are built without pyplot (no global state, no display needed) and saved as PNG bytes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def learning_curves(epochs: list[dict[str, Any]], best_epoch: int | None) -> bytes:
    """Loss and accuracy per epoch, training and validation, the kept epoch marked."""
    fig = _figure(9, 3.4)
    loss_ax, acc_ax = fig.subplots(1, 2)
    x = [e["epoch"] for e in epochs]
    for ax, key, title in ((loss_ax, "loss", "loss (cross-entropy)"),
                           (acc_ax, "accuracy", "accuracy")):  # fmt: skip
        ax.plot(x, [e[f"train_{key}"] for e in epochs], "o-", label="training", markersize=3)
        val = [e.get(f"val_{key}") for e in epochs]
        if any(v is not None for v in val):
            ax.plot(x, [np.nan if v is None else v for v in val], "s-", label="validation",
                    markersize=3)  # fmt: skip
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(-0.03, 1.03)  # a curve at 0 or 1 stays above or below the axis, visible
    loss_ax.legend(fontsize=8)
    acc_ax.legend(fontsize=8)
    return _png(fig)


def confusion_matrix(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """Counts in every cell, shaded by each true class's share."""
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = max(3.5, 0.5 * len(classes) + 2.0)
    size = 11 if len(classes) <= 12 else 8  # numbers a person reads at the page's width
    fig = _figure(side + 0.6, side)
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=size,
                    color="white" if share[i, j] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(range(len(classes)), classes, fontsize=size)
    ax.set_xlabel("predicted class", fontsize=size)
    ax.set_ylabel("true class", fontsize=size)
    ax.set_title(title, fontsize=12)
    return _png(fig)


def sweep_curves(rows: list[dict[str, Any]], tests: list[str], varied: list[str]) -> bytes:
    """`synthflux sweep`: accuracy on each test set against synthetic images per class, a
    line per source mix and varied setting, the real-only accuracy as a dashed line."""
    fig = _figure(5.5 * len(tests), 4)
    axes = np.atleast_1d(fig.subplots(1, len(tests)))
    for ax, test in zip(axes, tests, strict=True):
        for i, combo in enumerate(sorted({tuple(r[k] for k in varied) for r in rows})):
            mine = [r for r in rows if tuple(r[k] for k in varied) == combo and r[test] is not None]
            label = ", ".join(f"{k}={v}" for k, v in zip(varied, combo, strict=True))
            color = f"C{i}"
            for sources, marker in (("synthetic", "o-"), ("both", "s--")):
                curve = sorted((r["synthetic_per_class"], r[test]) for r in mine
                               if r["sources"] == sources)  # fmt: skip
                if curve:
                    ax.plot(*zip(*curve, strict=True), marker, color=color, alpha=1 if sources == "synthetic" else 0.6,
                            label=f"{sources} {label}".strip())  # fmt: skip
            for r in (r for r in mine if r["sources"] == "real"):
                ax.axhline(r[test], color=color, linestyle=":",
                           label=f"real only ({r['real_per_class']:g}/class) {label}".strip())  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("synthetic images per class")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(test.removeprefix("test:"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def real_and_generated(real: dict[str, list[Any]], made: dict[str, list[Any]]) -> bytes:
    """A row per class: real training images on the left, generated ones on the right (PIL
    images, as they are on disk)."""
    classes = list(real)
    n = max(len(v) for v in [*real.values(), *made.values()])
    fig = _figure(0.55 * (2 * n + 2), 0.55 * len(classes) + 0.5)
    axes = fig.subplots(len(classes), 2 * n + 2, squeeze=False, gridspec_kw={"wspace": 0.05})
    for r, c in enumerate(classes):
        for ax in axes[r]:
            ax.set_axis_off()
        axes[r, 0].text(0.5, 0.5, c, ha="center", va="center", fontsize=11)
        for j, im in enumerate(real[c]):
            axes[r, 1 + j].imshow(im, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for j, im in enumerate(made.get(c, [])):
            axes[r, 2 + n + j].imshow(im, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[0, 1 + n // 2].set_title("real (training)", fontsize=11)
    axes[0, 2 + n + n // 2].set_title("generated", fontsize=11)
    return _png(fig)
