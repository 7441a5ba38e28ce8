"""`synthflux report`: a self-contained HTML page and a contact-sheet PNG of a classified run.

A person would rather look than read a CSV: thumbnails grouped by class, each with its prompt,
seed and predicted probabilities, and the confusion matrix. Reads DATA/predictions/
(predictions.csv, summary.json) and the generated PNGs; writes DATA/report/.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from synthflux.config import PipelineConfig
from synthflux.drawing import Writer
from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.progress import plural
from synthflux.storage import atomic_write, write_bytes_atomic

THUMB = 128  # thumbnail side in pixels
CAPTION_LINES = 6


@dataclass(frozen=True)
class Report:
    html: Path
    contact_sheet: Path
    shown: int
    total: int


def _load(cfg: PipelineConfig) -> tuple[dict[str, Any], list[dict[str, str]]]:
    layout = DataLayout(cfg.data_root)
    pred = layout.predictions
    summary_path, csv_path = layout.summary, layout.predictions_csv
    if not summary_path.is_file() or not csv_path.is_file():
        raise DataError(
            f"{pred} has no summary.json/predictions.csv: run `synthflux classify` first"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        with open(csv_path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        wanted = {"id", "name", "class", "prompt", "seed", "file", "predicted"}
        wanted |= {f"p_{c}" for c in summary["classes"]}
        missing = wanted - set(reader.fieldnames or [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{pred}: unreadable predictions ({e}); re-run `synthflux classify`"
        ) from None
    if missing:
        raise DataError(
            f"{csv_path} lacks columns {sorted(missing)} (another config?); re-run `synthflux classify`"
        )
    return summary, rows


def _thumbnail(cfg: PipelineConfig, row: dict[str, str]) -> Image.Image:
    path = DataLayout(cfg.data_root).inside_generated(row["file"])
    try:
        if path is None:  # never open a path outside generated/
            raise ValueError(row["file"])
        with Image.open(path) as im:
            # contain() also enlarges: tiny-model images are 32 px; keep their pixels sharp.
            return ImageOps.contain(im.convert("RGB"), (THUMB, THUMB), Image.Resampling.NEAREST)
    except (OSError, ValueError):  # a missing image still gets its caption
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))


def _probabilities(row: dict[str, str], classes: list[str]) -> str:
    return " ".join(f"{c}={float(row[f'p_{c}']):.2f}" for c in classes)


def build_report(cfg: PipelineConfig, per_class: int = 24, out: Path | None = None) -> Report:
    """Write DATA/report/index.html and contact-sheet.png for up to `per_class` images a class."""
    summary, rows = _load(cfg)
    classes: list[str] = summary["classes"]
    picked = {c: [r for r in rows if r["class"] == c][:per_class] for c in classes}
    out = out or DataLayout(cfg.data_root).report  # elsewhere, for a read-only data root
    thumbs = {r["id"]: _thumbnail(cfg, r) for group in picked.values() for r in group}
    sheet = _contact_sheet(picked, thumbs, classes, summary)
    sheet_path = out / "contact-sheet.png"
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(sheet_path, buf.getvalue())
    html_path = out / "index.html"
    with atomic_write(html_path, "w") as f:
        f.write(_html(picked, thumbs, classes, summary))
    shown = sum(len(g) for g in picked.values())
    return Report(html_path, sheet_path, shown, len(rows))


def _contact_sheet(
    picked: dict[str, list[dict[str, str]]],
    thumbs: dict[str, Image.Image],
    classes: list[str],
    summary: dict[str, Any],
) -> Image.Image:
    cols = max(1, min(8, max((len(g) for g in picked.values()), default=1)))
    cell_w, line_h = THUMB + 16, 13
    cell_h = THUMB + CAPTION_LINES * line_h + 12
    header_h = 24
    matrix_h = (len(classes) + 3) * 16
    blocks = [header_h + max(1, -(-len(picked[c]) // cols)) * cell_h for c in classes]
    sheet = Image.new("RGB", (cols * cell_w + 16, sum(blocks) + matrix_h + 16), "white")
    write = Writer(ImageDraw.Draw(sheet))
    y = 8
    for c, block in zip(classes, blocks, strict=True):
        write.text((8, y + 4), f"class {c} ({plural(summary['counts'].get(c, 0), 'image')})")
        for i, row in enumerate(picked[c]):
            x0, y0 = 8 + (i % cols) * cell_w, y + header_h + (i // cols) * cell_h
            right = row["predicted"] == row["class"]
            sheet.paste(thumbs[row["id"]], (x0, y0))
            write.draw.rectangle(
                (x0 - 2, y0 - 2, x0 + THUMB + 1, y0 + THUMB + 1),
                outline="green" if right else "red",
            )
            caption = [f"#{row['id']} {row['name']}", f"seed {row['seed']}"]
            caption += [_probabilities(row, classes)]
            caption += textwrap.wrap(row["prompt"], 22)[: CAPTION_LINES - 3]
            for j, text in enumerate(caption):
                write.text((x0, y0 + THUMB + 4 + j * line_h), text)
        y += block
    _draw_matrix(write, (8, y + 4), classes, summary["confusion_matrix"]["matrix"])
    return sheet


def _draw_matrix(
    write: Writer, at: tuple[int, int], classes: list[str], matrix: list[list[int]]
) -> None:
    """The confusion matrix as a table: every cell right-aligned in its column."""
    x, y = at
    write.text((x, y), "confusion matrix (rows: prompt class, columns: predicted)")
    names = [c[:12] for c in classes]
    first = max(write.length(n) for n in names) + 12
    width = max(max(write.length(n) for n in names), write.length("0000")) + 12
    for j, name in enumerate(names):
        write.right(x + first + (j + 1) * width, y + 16, name)
    for i, name in enumerate(names):
        write.text((x, y + 32 + i * 16), name)
        for j, value in enumerate(matrix[i]):
            write.right(x + first + (j + 1) * width, y + 32 + i * 16, str(value))


def _timing(stage: str, t: dict[str, Any]) -> str:
    """The result's cost, and this run's when it differs (a resumed or skipped run)."""
    result, run = t.get("result_seconds", t.get("seconds", 0.0)), t.get("seconds", 0.0)
    return f"{stage} {result:.1f}s" + (f" ({run:.1f}s in the last run)" if run != result else "")


def _data_uri(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _html(
    picked: dict[str, list[dict[str, str]]],
    thumbs: dict[str, Image.Image],
    classes: list[str],
    summary: dict[str, Any],
) -> str:
    e = html.escape
    matrix = summary["confusion_matrix"]["matrix"]
    head = "".join(f"<th>{e(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><th>{e(c)}</th>" + "".join(f"<td>{v}</td>" for v in matrix[i]) + "</tr>"
        for i, c in enumerate(classes)
    )
    timings = ", ".join(_timing(stage, t) for stage, t in summary.get("timings", {}).items())
    sections = []
    for c in classes:
        cards = []
        for r in picked[c]:
            ok = "ok" if r["predicted"] == r["class"] else "wrong"
            cards.append(
                f'<figure class="{ok}"><img src="{_data_uri(thumbs[r["id"]])}" alt="{e(r["name"])}">'
                f"<figcaption><b>#{e(r['id'])}</b> seed {e(r['seed'])}<br>{e(_probabilities(r, classes))}"
                f"<br>predicted <b>{e(r['predicted'])}</b><br><i>{e(r['prompt'])}</i></figcaption></figure>"
            )
        sections.append(
            f"<h2>{e(c)} <small>({plural(summary['counts'].get(c, 0), 'image')}, showing {len(picked[c])})</small></h2>"
            f'<div class="grid">{"".join(cards)}</div>'
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthflux report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #aaa; padding: .3em .8em; text-align: right; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ width: {THUMB + 40}px; margin: 0; font-size: 12px; border: 3px solid #ccc; padding: 4px; }}
figure.ok {{ border-color: #3a3; }} figure.wrong {{ border-color: #c33; }}
img {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; image-rendering: pixelated; }}
</style></head><body>
<h1>synthflux report</h1>
<p>{plural(summary["images"], "image")} in {plural(summary["shards"], "shard")}; accuracy against the prompt labels
<b>{"n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"}</b> ({summary["correct"]}/{summary["images"]}); backend {e(str(summary.get("backend")))};
timings: {e(timings)}.</p>
<h2>Confusion matrix</h2>
<table><tr><th>prompt \\ predicted</th>{head}</tr>{body}</table>
{"".join(sections)}
</body></html>
"""
