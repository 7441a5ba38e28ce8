"""`synthflux report`: a self-contained HTML page and pictures of a trained and evaluated run.

A person would rather look than read a CSV: the learning curves, each split's scores and
confusion matrix, the real test images the model got wrong, and thumbnails by class with
prompt, seed and probabilities. Reads DATA/predictions/, DATA/evaluation/ and
DATA/training/run/metrics.jsonl (each when there); writes DATA/report/ (or --out).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from synthflux import headline, lineage, plots
from synthflux.config import PipelineConfig
from synthflux.contact_sheet import THUMB, contact_sheet, probabilities
from synthflux.distribution import relative_to_real, shown
from synthflux.errors import DataError
from synthflux.layout import SYNTHETIC, DataLayout
from synthflux.metrics import split_title
from synthflux.progress import plural
from synthflux.sources import imported
from synthflux.stages import Option, Stage, at_least
from synthflux.storage import atomic_write, write_bytes_atomic

MISTAKES = 48  # at most this many wrongly classified test images are shown


@dataclass(frozen=True)
class Report:
    html: Path
    contact_sheet: Path
    shown: int
    total: int
    pictures: list[Path]


def build_report(cfg: PipelineConfig, per_class: int = 24, out: Path | None = None) -> Report:
    """Write index.html, contact-sheet.png and the plots for up to `per_class` images a class."""
    layout = cfg.layout
    out = out or layout.report  # elsewhere, for a read-only data root
    summary, rows = _load(layout)
    evaluation, eval_rows = _load_evaluation(layout)
    epochs = _load_metrics(layout)
    classes: list[str] = summary["classes"]
    # 1. thumbnails by class, of the synthetic images (else the first source's), in id order
    # (shards mix the classes, so the CSV's order is not the images')
    first = next((r["source"] for r in rows if r["source"] == SYNTHETIC), rows[0]["source"])
    in_order = sorted((r for r in rows if r["source"] == first), key=lambda r: int(r["id"]))
    picked = {c: [r for r in in_order if r["class"] == c][:per_class] for c in classes}
    thumbs = {(r["source"], r["id"]): _thumbnail(layout, r) for g in picked.values() for r in g}
    sheet_path = out / "contact-sheet.png"
    write_bytes_atomic(sheet_path, _png(contact_sheet(picked, thumbs, classes, summary)))
    # 2. the plots; 3. the test images the model got wrong
    pictures = _plots(out, classes, evaluation, epochs)
    if side_by_side := _real_and_generated(cfg, rows, classes):
        pictures["real and generated"] = out / "real-and-generated.png"
        write_bytes_atomic(pictures["real and generated"], side_by_side)
    wrong = [r for r in eval_rows if r["kind"] == "test" and r["correct"] == "0"]
    thumbs |= {(r["source"], r["id"]): _thumbnail(layout, r) for r in wrong[:MISTAKES]}
    # 4. the page, everything in it
    filtered = lineage.marker(cfg, "filter") if cfg.filters else None
    page = _html(picked, thumbs, classes, summary, evaluation, epochs, pictures, wrong, filtered)
    html_path = out / "index.html"
    with atomic_write(html_path, "w") as f:
        f.write(page)
    shown = sum(len(g) for g in picked.values())
    return Report(html_path, sheet_path, shown, len(rows), list(pictures.values()))


# --- inputs -----------------------------------------------------------------------------------


def _load(layout: DataLayout) -> tuple[dict[str, Any], list[dict[str, str]]]:
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
        wanted = {"id", "source", "name", "class", "prompt", "seed", "file", "predicted"}
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
    if not rows:
        raise DataError(f"{csv_path} has no predictions: re-run `synthflux classify`")
    return summary, rows


def _load_evaluation(layout: DataLayout) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """evaluation/summary.json and its rows (each with its split's kind), if evaluate ran."""
    try:
        evaluation = json.loads(layout.evaluation_summary.read_text(encoding="utf-8"))
        with open(layout.evaluation_csv, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return None, []
    except (OSError, ValueError) as e:
        raise DataError(
            f"{layout.evaluation}: unreadable ({e}); re-run `synthflux evaluate`"
        ) from None
    kinds = {name: s.get("kind") for name, s in evaluation.get("splits", {}).items()}
    for r in rows:
        r["kind"] = kinds.get(r["split"], "")
    return evaluation, rows


def _load_metrics(layout: DataLayout) -> list[dict[str, Any]]:
    path = layout.metrics
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _thumbnail(layout: DataLayout, row: dict[str, str]) -> Image.Image:
    path = layout.source(row.get("source") or SYNTHETIC).inside(row["file"])
    try:
        if path is None:  # never open a path outside the source's folder
            raise ValueError(row["file"])
        with Image.open(path) as im:
            # contain() also enlarges: tiny-model images are 32 px; keep their pixels sharp.
            return ImageOps.contain(im.convert("RGB"), (THUMB, THUMB), Image.Resampling.NEAREST)
    except (OSError, ValueError):  # a missing image still gets its caption
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))


def _real_and_generated(
    cfg: PipelineConfig, rows: list[dict[str, str]], classes: list[str], n: int = 8
) -> bytes | None:
    """The first n real training and generated images of each class, side by side (when the
    run has both)."""
    real = next((s.name for s in imported(cfg.layout) if s.split == "train"), None)
    if real is None or not any(r["source"] == SYNTHETIC for r in rows):
        return None
    picked: dict[str, dict[str, list[Image.Image]]] = {real: {}, SYNTHETIC: {}}
    for r in sorted(rows, key=lambda r: int(r["id"])):
        group = picked.get(r["source"], {}).setdefault(r["class"], [])
        if r["source"] in picked and len(group) < n:
            path = cfg.layout.source(r["source"]).inside(r["file"])
            with contextlib.suppress(OSError), Image.open(path or "") as im:
                group.append(im.convert("L") if im.mode in ("L", "P") else im.convert("RGB"))
    return plots.real_and_generated({c: picked[real].get(c, []) for c in classes},
                                    {c: picked[SYNTHETIC].get(c, []) for c in classes})  # fmt: skip


# --- pictures ---------------------------------------------------------------------------------


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _plots(
    out: Path, classes: list[str], evaluation: dict[str, Any] | None, epochs: list[dict[str, Any]]
) -> dict[str, Path]:
    """learning-curves.png and confusion-<split>.png, by what they show."""
    pictures: dict[str, Path] = {}
    if epochs:
        best = _kept_epoch(epochs)
        pictures["learning curves"] = out / "learning-curves.png"
        write_bytes_atomic(pictures["learning curves"], plots.learning_curves(epochs, best))
    for name, split in (evaluation or {}).get("splits", {}).items():
        path = out / f"confusion-{name}.png"
        title = (
            f"{name}: accuracy {split['accuracy']:.3f}"
            if split.get("accuracy") is not None
            else name
        )
        write_bytes_atomic(path, plots.confusion_matrix(split["confusion_matrix"]["matrix"],
                                                        classes, title))  # fmt: skip
        pictures[name] = path
    return pictures


def _kept_epoch(epochs: list[dict[str, Any]]) -> int:
    scored = [e for e in epochs if e.get("val_loss") is not None]
    if not scored:
        return int(epochs[-1]["epoch"])
    return int(min(scored, key=lambda e: (e["val_loss"], e["epoch"]))["epoch"])


# --- the page ---------------------------------------------------------------------------------


def _shown(shown: int, total: int) -> str:
    return f"all {total}" if shown == total else f"{shown} of {total} shown"


def _timing(stage: str, t: dict[str, Any]) -> str:
    """The result's cost, and this run's when it differs (a resumed or skipped run)."""
    result = t.get("result_seconds", t.get("seconds", t.get("classifier_seconds", 0.0)))
    run = t.get("seconds", result)
    return f"{stage} {result:.1f}s" + (f" ({run:.1f}s in the last run)" if run != result else "")


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _card(r: dict[str, str], thumb: Image.Image, classes: list[str], wrong_only: bool) -> str:
    """One image: its id on a line of its own (cut, never wrapped into the labels), what it
    is and what the CNN said, then where it comes from (source, and seed or file)."""
    e = html.escape
    ok = "ok" if r["predicted"] == r["class"] else "wrong"
    said = f"true <b>{e(r['class'])}</b> · predicted <b>{e(r['predicted'])}</b>"
    origin = f"{e(r['source'])} · " + (e(r["file"]) if wrong_only or not r.get("seed")
                                         else f"seed {e(r['seed'])}")  # fmt: skip
    more = "" if wrong_only else (f"<div class='probs'>{e(probabilities(r, classes))}</div>"
                                  + (f"<i>{e(r['prompt'])}</i>" if r.get("prompt") not in (None, "", r["class"]) else ""))  # fmt: skip
    return (f'<figure class="{ok}"><img src="{_data_uri(_png(thumb))}" alt="{e(r["name"])}">'
            f"<figcaption><div class='id' title='{e(r['id'])}'>#{e(r['id'])}</div>"
            f"<div>{said}</div><div class='origin'>{origin}</div>{more}</figcaption></figure>")  # fmt: skip


def _side_by_side_html(pictures: dict[str, Path]) -> str:
    if "real and generated" not in pictures:
        return ""
    uri = _data_uri(pictures["real and generated"].read_bytes())
    return (f'<h2>Real and generated</h2><img class="plot" src="{uri}" alt="real training '
            'images and generated ones, a row per class">')  # fmt: skip


def _filter_html(marker: dict[str, Any] | None) -> str:
    """What the filter kept per class and dropped per reason (filtered/scores.jsonl has each
    image's scores and reason)."""
    if not marker:
        return ""
    e = html.escape
    kept = "".join(f"<tr><th>{e(c)}</th><td>{n}</td></tr>" for c, n in marker["kept"].items())
    dropped = ", ".join(f"{n} {e(reason)}" for reason, n in marker["dropped"].items()) or "none"
    return (f"<h2>Filter</h2><p>Generated images dropped before training: {dropped} (each "
            f"image's scores and reason: <code>filtered/scores.jsonl</code>).</p><table><tr>"
            f"<th>class</th><th>kept</th></tr>{kept}</table>")  # fmt: skip


def _evaluation_html(evaluation: dict[str, Any] | None, pictures: dict[str, Path]) -> str:
    if not evaluation:
        return "<p>Not evaluated yet (<code>synthflux evaluate</code>).</p>"
    e = html.escape
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    title = {n: split_title(n, s["kind"]) for n, s in evaluation["splits"].items()}
    rows = "".join(
        f"<tr><th>{e(title[name])}</th><td>{e(', '.join(s['sources']))}</td><td>{s['images']}</td>"
        f"<td>{fmt(s['accuracy'])}</td><td>{fmt(s['macro']['f1'])}</td></tr>"
        for name, s in evaluation["splits"].items()
    )
    parts = [f"<table><tr><th>split</th><th>of source</th><th>images</th><th>accuracy</th>"
             f"<th>macro F1</th></tr>{rows}</table>"]  # fmt: skip
    for name, s in evaluation["splits"].items():
        cells = "".join(
            f"<tr><th>{e(c)}</th><td>{fmt(v['precision'])}</td><td>{fmt(v['recall'])}</td>"
            f"<td>{fmt(v['f1'])}</td><td>{v['support']}</td></tr>"
            for c, v in s["per_class"].items()
        )
        image = f'<img class="plot" src="{_data_uri(pictures[name].read_bytes())}" alt="{e(name)}">'
        parts.append(f"<h3>{e(title[name])}</h3><div class='pair'>{image}<table><tr><th>class</th>"
                     f"<th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>{cells}"
                     "</table></div>")  # fmt: skip
    parts += [f"<p><i>{e(note)}</i></p>" for note in evaluation.get("notes", [])]
    return "".join(parts) + _distribution_html(evaluation.get("distribution"))


def _distribution_html(d: dict[str, Any] | None) -> str:
    """Each training source against each test set, overall and per class."""
    if d is None:
        return "<h3>Distribution</h3><p>Not computed: re-run <code>synthflux evaluate</code>.</p>"
    if not d:
        return "<h3>Distribution</h3><p>No test set to compare the training sources with.</p>"
    e = html.escape
    head = "".join(f"<th>{h}</th>" for h in ("training source", "test set", "class", "images",
                   "FD", "KID", "precision", "recall", "density", "coverage", "diversity",
                   "duplicates"))  # fmt: skip
    rows = []
    for c in d["comparisons"]:
        dups = d["sources"][c["train"]]
        each = [(k, m, dups["per_class"][k]["rate"]) for k, m in c["per_class"].items()]
        for name, m, dup in [("all", c["overall"], dups["rate"]), *each]:
            cells = [shown(m["fd"], ".4g"), shown(m["kid"], ".4g")]
            cells += [shown(m[k], ".3f") for k in ("precision", "recall", "density", "coverage")]
            cells += [shown(m["diversity"], ".2f"), shown(dup, ".1%")]
            rows.append(f"<tr><th>{e(c['train'])}</th><th>{e(c['test'])}</th><th>{e(name)}</th>"
                        f"<td>{m['images']['train']} / {m['images']['test']}</td>"
                        + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")  # fmt: skip
    return (f"<h3>Distribution</h3><p><b>On this project's own CNN features, not Inception's: "
            f"not comparable with published FID/KID.</b> Features: {e(d['features'])}. "
            f"Precision/recall/density/coverage with k = {d['k']} nearest neighbours (the test "
            "set is the real one); diversity: the RMS pairwise feature distance within a class "
            "relative to the test set's (the mean over classes for all); duplicates: the share "
            f"of the training source's images with a twin ({e(d['duplicate_rule'])}). "
            f'{e(d["n/a"])}.</p><table id="distribution"><tr>{head}</tr>{"".join(rows)}</table>'
            + "".join(f"<p><b>{e(line)}</b></p>" for line in relative_to_real(d)))  # fmt: skip


def _html(
    picked: dict[str, list[dict[str, str]]],
    thumbs: dict[tuple[str, str], Image.Image],
    classes: list[str],
    summary: dict[str, Any],
    evaluation: dict[str, Any] | None,
    epochs: list[dict[str, Any]],
    pictures: dict[str, Path],
    wrong: list[dict[str, str]],
    filtered: dict[str, Any] | None,
) -> str:
    e = html.escape
    timings = ", ".join(_timing(stage, t) for stage, t in summary.get("timings", {}).items())
    curves = (f'<img class="plot" src="{_data_uri(pictures["learning curves"].read_bytes())}" '
              f'alt="learning curves"><p>{len(epochs)} epochs; the kept weights are epoch '
              f"{_kept_epoch(epochs)}'s.</p>" if epochs else "<p>No training metrics.</p>")  # fmt: skip
    wrong_total, wrong = len(wrong), wrong[:MISTAKES]  # every mistake counted, the first shown
    mistakes = "".join(_card(r, thumbs[r["source"], r["id"]], classes, True) for r in wrong)
    sections = []
    for c in classes:
        cards = "".join(_card(r, thumbs[r["source"], r["id"]], classes, False) for r in picked[c])
        sections.append(
            f"<h3>{e(c)} <small>({plural(summary['counts'].get(c, 0), 'image')}, showing "
            f'{len(picked[c])})</small></h3><div class="grid" data-class="{e(c)}">{cards}</div>'
        )
    accuracy = "n/a" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthflux report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #aaa; padding: .3em .8em; text-align: right; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }} .pair {{ display: flex; gap: 2em; align-items: flex-start; }}
figure {{ width: {THUMB + 40}px; margin: 0; font-size: 12px; border: 3px solid #ccc; padding: 4px; overflow-wrap: anywhere; }}
figure .id {{ white-space: nowrap; overflow: hidden; text-overflow: ellipsis; color: #555; }}
figure .origin, figure .probs {{ color: #555; font-size: 11px; }}
.legend span {{ display: inline-block; width: 1em; height: 1em; vertical-align: middle; border: 3px solid; }}
figure.ok {{ border-color: #3a3; }} figure.wrong {{ border-color: #c33; }}
figure img {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; image-rendering: pixelated; }}
img.plot {{ max-width: 100%; }}
</style></head><body>
<h1>synthflux report</h1>
<p id="headline">{" ".join(headline.sentences(evaluation, classes))}</p>
<p><small>All {plural(summary["images"], "image")} classified (training and test sources
together, backend {e(str(summary.get("backend")))}): {accuracy} against their labels
({summary["correct"]}/{summary["images"]}); timings: {e(timings)}.</small></p>
{_filter_html(filtered)}{_side_by_side_html(pictures)}<h2>Training</h2>{curves}
<h2>Evaluation</h2>{_evaluation_html(evaluation, pictures)}
<h2>Test images it got wrong <small>({_shown(len(wrong), wrong_total)})</small></h2>
<div class="grid" id="mistakes">{mistakes or "<p>None (or no test set).</p>"}</div>
<h2>Predictions by class</h2>
<p class="legend"><span style="border-color:#3a3"></span> predicted its class &nbsp;
<span style="border-color:#c33"></span> predicted another class</p>
{"".join(sections)}
</body></html>
"""


# --- as the pipeline's last stage -------------------------------------------------------------


@dataclass
class ReportSummary:
    report: Report
    complete: bool = True

    def lines(self) -> list[str]:
        r = self.report
        return [f"{r.shown} of {r.total} images shown", f"  {r.html}", f"  {r.contact_sheet}"]


def run(cfg: PipelineConfig, *, per_class: int = 24, out: Path | None = None) -> ReportSummary:
    """Build the report; stage.json says from which predictions and evaluation."""
    report = build_report(cfg, per_class=per_class, out=out)
    if out is None:  # a report elsewhere is not the stage's result
        lineage.record(cfg, "report", key=key(cfg), seconds=0.0,
                       outputs=[report.html, report.contact_sheet, *report.pictures])  # fmt: skip
    return ReportSummary(report)


def key(cfg: PipelineConfig) -> str:
    """The keys of the results it shows (each stage's own key covers its inputs)."""
    markers = {s: (lineage.marker(cfg, s) or {}).get("key") for s in STAGE.needs}
    return hashlib.sha256(json.dumps(markers, sort_keys=True).encode()).hexdigest()


STAGE = Stage(
    "report", run, key=key, folder=lambda layout: layout.report,
    results=lambda cfg: [cfg.layout.report / "index.html"],
    needs=("filter", "train", "classify", "evaluate"), unit="reports", product="report pages",
    options=(
        Option(("--per-class",), {"type": at_least(1), "default": 24, "metavar": "N",
                                  "help": "images shown per class (default: 24)"}),
        Option(("--out",), {"type": Path, "metavar": "FOLDER",
                            "help": "write the report here instead of DATA/report/ (for a "
                                    "read-only data root; not the stage's result)"}),
    ),
    help="an HTML page: images by class, scores, plots and the mistakes",
    description="Build DATA/report/index.html from classify's predictions, evaluate's scores "
    "and training's metrics: a contact sheet, thumbnails by class with their probabilities, "
    "the confusion matrix and learning curves, and the test images the model got wrong. "
    "Everything is inside the page (no network, no external files).",
)  # fmt: skip
