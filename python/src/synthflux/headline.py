"""What a run measured, said first: the accuracy on each real test set by name, next to the
validation accuracy and, for a CNN trained without real images, the real-only baseline; and
plainly so when a number is no better than chance. The report opens with it."""

from __future__ import annotations

import html
import math
from typing import Any


def chance_margin(classes: int, images: int) -> float:
    """Accuracy at or below 1/K plus two standard errors of a guess is "chance"."""
    p = 1 / classes
    return p + 2 * math.sqrt(p * (1 - p) / max(images, 1))


def _accuracy(s: dict[str, Any]) -> str:
    return "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"


def sentences(evaluation: dict[str, Any] | None, classes: list[str]) -> list[str]:
    """The headline as HTML sentences (escaped)."""
    e = html.escape
    if not evaluation:
        return ["Not evaluated yet: run <code>synthflux evaluate</code>."]
    splits = evaluation.get("splits", {})
    trained = ", ".join(evaluation.get("trained_on", [])) or "?"
    tests = {n: s for n, s in splits.items() if s["kind"] == "test"}
    base = (evaluation.get("baseline") or {}).get("tests", {})
    out = []
    for name, s in tests.items():
        line = (f"Accuracy on the real test set <b>{e(name)}</b> ({s['images']} images) of the "
                f"CNN trained on <b>{e(trained)}</b>: <b class='headline'>{_accuracy(s)}</b>")  # fmt: skip
        if name in base:
            line += (f", against <b>{_accuracy(base[name])}</b> for the same CNN trained on the "
                     f"real training images alone ({evaluation['baseline']['images']} images)")  # fmt: skip
        acc = s["accuracy"]
        if acc is not None and acc <= chance_margin(len(classes), s["images"]):
            line += (f" &mdash; <b>no better than chance</b> (1/{len(classes)} = "
                     f"{1 / len(classes):.3f}): the CNN learned nothing that carries over")  # fmt: skip
        out.append(line + ".")
    if "validation" in splits:
        v = splits["validation"]
        chance = v["accuracy"] is not None and v["accuracy"] <= chance_margin(
            len(classes), v["images"]
        )
        out.append(f"Validation accuracy (held-out {e(', '.join(v['sources']))} images, "
                   f"{v['images']}): {_accuracy(v)}"
                   + (" &mdash; no better than chance" if chance else "") + ".")  # fmt: skip
    if not tests:
        out.append("No real test set: import one with <code>synthflux import CONFIG FOLDER "
                   "--as test</code> to measure the CNN on real images.")  # fmt: skip
    return out
