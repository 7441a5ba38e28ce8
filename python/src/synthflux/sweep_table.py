"""The sweep's results: the table (CSV and printed), the plot, and the exchange rate "one
real image ≈ k synthetic" read off each curve."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
from collections.abc import Callable
from typing import Any

from synthflux.layout import DataLayout
from synthflux.storage import write_bytes_atomic, write_json_atomic


def exchange_rate(real: float, real_per_class: float, curve: list[tuple[int, float]]) -> str:
    """ "one real image ≈ k synthetic": where the synthetic curve (N per class, accuracy)
    reaches the real-only accuracy, interpolated in log N, over the real images per class."""
    curve = sorted(curve)
    if not curve or real_per_class <= 0:
        return "n/a"
    if curve[0][1] >= real:
        return f"one real image ≈ at most {curve[0][0] / real_per_class:.2g} synthetic"
    for (n0, a0), (n1, a1) in itertools.pairwise(curve):
        if a1 >= real > a0:
            t = (real - a0) / (a1 - a0)
            n = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
            return f"one real image ≈ {n / real_per_class:.2g} synthetic (the real baseline at N ≈ {n:.0f} per class)"
    best = max(curve, key=lambda c: c[1])
    return (f"synthetic images did not reach the real baseline ({real:.3f}); the best was "
            f"{best[1]:.3f} at N = {best[0]}")  # fmt: skip


def _rates(rows: list[dict[str, Any]], tests: list[str], varied: list[str]) -> list[str]:
    out = []
    for combo, grouped in itertools.groupby(sorted(rows, key=lambda r: [r[k] for k in varied]),
                                            key=lambda r: [r[k] for k in varied]):  # fmt: skip
        group = list(grouped)
        base = next((r for r in group if r["sources"] == "real"), None)
        curve = [r for r in group if r["sources"] == "synthetic"]
        where = ", ".join(f"{k}={v}" for k, v in zip(varied, combo, strict=True))
        for test in tests:
            if base is None or base[test] is None or not curve:
                continue
            # per class as trained on: after a filter, the images it kept
            points = [(r.get("kept_per_class", r["synthetic_per_class"]), r[test])
                      for r in curve if r[test] is not None]  # fmt: skip
            rate = exchange_rate(base[test], base["real_per_class"], points)
            out.append(f"on {test.removeprefix('test:')}{f' ({where})' if where else ''}: {rate}")
    return out


def publish(
    layout: DataLayout, rows: list[dict[str, Any]], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Write the table, the plot and the summary under DATA/sweep/, and print the table and
    the exchange rates."""
    from synthflux.plots import sweep_curves

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(layout.sweep_table, buf.getvalue().encode())
    tests = [c for c in columns if c.startswith("test:")]
    varied = [k for k in columns if k not in ("point", "sources", "synthetic_per_class",
              "real_per_class", "kept_per_class", "train_images", "val_accuracy")
              and k not in tests]  # fmt: skip
    rates = _rates(rows, tests, varied)
    if tests:
        write_bytes_atomic(layout.sweep_plot, sweep_curves(rows, tests, varied))
    write_json_atomic(layout.sweep_summary, {"rows": rows, "exchange_rates": rates,
                      "key": hashlib.sha256(json.dumps(rows).encode()).hexdigest()})  # fmt: skip
    for line in _table_lines(rows, columns) + rates:
        say(line)
    say(f"wrote {layout.sweep_table}" + (f" and {layout.sweep_plot}" if tests else
        " (no test set imported: no plot; `synthflux import CONFIG FOLDER --as test`)"))  # fmt: skip
    return rows


def _table_lines(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """The table as printed: every column, with headers a person can read (the CSV keeps its
    names: "test:NAME" is the accuracy on test set NAME)."""
    heads = {"val_accuracy": "validation acc.", "real_per_class": "real/class",
             "synthetic_per_class": "synthetic/class", "train_images": "train images",
             "kept_per_class": "kept/class"}  # fmt: skip

    def head(c: str) -> str:
        return f"acc. on {c.removeprefix('test:')}" if c.startswith("test:") else heads.get(c, c)

    def cell(c: str, v: Any) -> str:
        if v is None:
            return "n/a"
        if c in ("real_per_class", "kept_per_class"):
            return f"{v:g}"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(head(c)), *(len(cell(c, r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(head(c).ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(c, r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return lines
