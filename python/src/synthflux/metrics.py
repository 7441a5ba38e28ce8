"""How well predictions match labels: counts, accuracy, the confusion matrix, per-class means.

One function from (labels, probabilities) to a JSON-ready dict, shared by classify's
summary.json and evaluate's per-split summaries.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """(K, K) int64: rows are the true labels, columns the predicted ones."""
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return confusion


def summarize(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], rows: str
) -> dict[str, Any]:
    """Counts, accuracy, confusion matrix (`rows` names what its rows are) and the mean
    probability of every class over each true class's images (None for an empty class)."""
    predicted = probs.argmax(axis=1)
    confusion = confusion_matrix(labels, predicted, len(classes))
    correct = int(np.trace(confusion))
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    mean_probs = {
        c: ({d: float(probs[labels == i, j].mean()) for j, d in enumerate(classes)}
            if counts[c] else None)
        for i, c in enumerate(classes)
    }  # fmt: skip
    return {
        "images": len(labels),
        "classes": classes,
        "counts": counts,
        "predicted_counts": {c: int((predicted == i).sum()) for i, c in enumerate(classes)},
        "correct": correct,
        "accuracy": correct / len(labels) if len(labels) else None,
        "confusion_matrix": {
            "rows": rows,
            "columns": "predicted class",
            "classes": classes,
            "matrix": confusion.tolist(),
        },
        "mean_probabilities": mean_probs,
    }


def per_class(matrix: list[list[int]], classes: list[str]) -> dict[str, Any]:
    """{"per_class": precision, recall, F1 and support of each class, "macro": their means over
    the classes present}; a class never predicted has precision None, one absent recall None."""
    m = np.asarray(matrix, dtype=np.int64)
    scores: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(classes):
        tp, predicted, actual = int(m[i, i]), int(m[:, i].sum()), int(m[i, :].sum())
        precision = tp / predicted if predicted else None
        recall = tp / actual if actual else None
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[c] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [v for v in scores.values() if v["support"]]
    macro = {
        k: (sum(v[k] or 0.0 for v in present) / len(present) if present else None)
        for k in ("precision", "recall", "f1")
    }
    return {"per_class": scores, "macro": macro}


def confusion_lines(classes: list[str], matrix: list[list[int]], rows: str) -> list[str]:
    """The confusion matrix for a terminal, each column right-aligned under its class."""
    width = max(len(c) for c in classes)
    cols = [max(len(c), 5) for c in classes]
    out = [f"confusion matrix (rows: {rows}, columns: predicted class):"]
    out.append(
        " " * (width + 3) + " ".join(f"{c:>{w}}" for c, w in zip(classes, cols, strict=True))
    )
    for name, row in zip(classes, matrix, strict=True):
        cells = " ".join(f"{v:>{w}}" for v, w in zip(row, cols, strict=True))
        out.append(f"  {name:<{width}} {cells}")
    return out


def split_title(name: str, kind: str) -> str:
    """A split named so that it never reads as a source (the default source is "train" too):
    "validation split", "training split", "test set NAME"."""
    return {"validation": "validation split", "train": "training split"}.get(
        kind, f"test set {name}"
    )
