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
        write.text((8, y + 4), f"class {c} ({plural(summary['counts'].get(c, 0), 'image')})")
        for i, row in enumerate(picked[c]):
            x0, y0 = 8 + (i % cols) * cell_w, y + header_h + (i // cols) * cell_h
            right = row["predicted"] == row["class"]
            sheet.paste(thumbs[row["source"], row["id"]], (x0, y0))
            write.draw.rectangle(
                (x0 - 2, y0 - 2, x0 + THUMB + 1, y0 + THUMB + 1),
                outline="green" if right else "red",
            )
            caption = [f"#{row['id']} {row['name']}", f"seed {row['seed']}"]
            caption += [probabilities(row, classes)]
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
    write.text((x, y), "confusion matrix (rows: true class, columns: predicted)")
    names = [c[:12] for c in classes]
    first = max(write.length(n) for n in names) + 12
    width = max(max(write.length(n) for n in names), write.length("0000")) + 12
    for j, name in enumerate(names):
        write.right(x + first + (j + 1) * width, y + 16, name)
    for i, name in enumerate(names):
        write.text((x, y + 32 + i * 16), name)
        for j, value in enumerate(matrix[i]):
            write.right(x + first + (j + 1) * width, y + 32 + i * 16, str(value))
