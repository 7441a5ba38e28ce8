"""contact-sheet.png: the report's thumbnails by class as one picture, with each image's id,
seed, probabilities and prompt, and the confusion matrix as a table."""

from __future__ import annotations

import textwrap
from typing import Any

from PIL import Image, ImageDraw

from synthflux.drawing import Writer
from synthflux.progress import plural

THUMB = 128  # thumbnail side in pixels
CAPTION_LINES = 6


def probabilities(row: dict[str, str], classes: list[str]) -> str:
    """ "0=0.01 1=0.97 ...": a row's probability of each class."""
    return " ".join(f"{c}={float(row[f'p_{c}']):.2f}" for c in classes)


def _caption(row: dict[str, str], classes: list[str]) -> list[str]:
    """A cell's lines: the image, what the CNN said (its two likeliest classes; the border says
    right or wrong), where the image comes from, and its prompt."""
    probs = sorted(((float(row[f"p_{c}"]), c) for c in classes), reverse=True)[:2]
    said = "likeliest " + " ".join(f"{c}={p:.2f}" for p, c in probs)
    origin = f"seed {row['seed']}" if row.get("seed") else f"{row['source']}: {row['file']}"
    lines = [row["name"], said, origin]
    if row.get("prompt") and row["prompt"] != row["class"]:
        lines += textwrap.wrap(row["prompt"], 24)[: CAPTION_LINES - 3]
    return lines


def _fit(write: Writer, text: str, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels: never into the next column."""
    if write.length(text) <= width:
        return text
    while text and write.length(text + "…") > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    picked: dict[str, list[dict[str, str]]],
    thumbs: dict[tuple[str, str], Image.Image],
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
        write.text(
            (8, y + 4), f"class {c} ({plural(summary['counts'].get(c, 0), 'image')} in all sources)"
        )
        for i, row in enumerate(picked[c]):
            x0, y0 = 8 + (i % cols) * cell_w, y + header_h + (i // cols) * cell_h
            right = row["predicted"] == row["class"]
            sheet.paste(thumbs[row["source"], row["id"]], (x0, y0))
            write.draw.rectangle(
                (x0 - 2, y0 - 2, x0 + THUMB + 1, y0 + THUMB + 1),
                outline="green" if right else "red",
            )
            for j, text in enumerate(_caption(row, classes)):
                write.text((x0, y0 + THUMB + 4 + j * line_h), _fit(write, text, cell_w - 10))
        y += block
    _draw_matrix(write, (8, y + 4), classes, summary["confusion_matrix"]["matrix"])
    return sheet


def _draw_matrix(
    write: Writer, at: tuple[int, int], classes: list[str], matrix: list[list[int]]
) -> None:
    """The confusion matrix as a table: every cell right-aligned in its column."""
    x, y = at
    write.text(
        (x, y),
        "confusion matrix of every classified image, training and test sources "
        "together (rows: true class, columns: predicted; the report has each split's)",
    )
    names = [c[:12] for c in classes]
    first = max(write.length(n) for n in names) + 12
    width = max(max(write.length(n) for n in names), write.length("0000")) + 12
    for j, name in enumerate(names):
        write.right(x + first + (j + 1) * width, y + 16, name)
    for i, name in enumerate(names):
        write.text((x, y + 32 + i * 16), name)
        for j, value in enumerate(matrix[i]):
            write.right(x + first + (j + 1) * width, y + 32 + i * 16, str(value))
