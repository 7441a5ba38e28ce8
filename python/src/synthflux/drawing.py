"""Text on report images in any script: é, ß, 猫 ...

Pillow draws one font at a time and shows a box for a character the font lacks, so each run
of text is split by the first font that has its characters: DejaVu Sans (shipped with
matplotlib, so always there), then every font matplotlib finds on the system (a CJK font for
猫, where one is installed). A character no font has is still drawn, with DejaVu's box.
"""

from __future__ import annotations

import functools

from PIL import ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont


@functools.cache
def _font_files() -> tuple[str, ...]:
    from matplotlib import font_manager

    first = font_manager.findfont("DejaVu Sans")
    others = {f.fname for f in font_manager.fontManager.ttflist}
    return (first, *sorted(p for p in others if p != first and p.endswith((".ttf", ".otf"))))


@functools.cache
def _characters(path: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # an unreadable font file is simply not used
        return frozenset()


@functools.cache
def _font_for(char: str) -> str:
    files = _font_files()
    return next((f for f in files if ord(char) in _characters(f)), files[0])


@functools.cache
def _font(path: str, size: int) -> Font:
    return ImageFont.truetype(path, size)


def _runs(text: str) -> list[tuple[str, str]]:
    """(text, font file) pieces of `text`, each drawable with one font."""
    runs: list[tuple[str, str]] = []
    for char in text:
        path = _font_for(char) if not char.isspace() else (runs[-1][1] if runs else "")
        path = path or _font_files()[0]
        if runs and runs[-1][1] == path:
            runs[-1] = (runs[-1][0] + char, path)
        else:
            runs.append((char, path))
    return runs


class Writer:
    """Draws text of one size on `draw`, falling back font by font as needed."""

    def __init__(self, draw: ImageDraw.ImageDraw, size: int = 11) -> None:
        self.draw, self.size = draw, size

    def length(self, text: str) -> float:
        return sum(self.draw.textlength(t, font=_font(p, self.size)) for t, p in _runs(text))

    def text(self, xy: tuple[float, float], text: str, fill: str = "black") -> None:
        x, y = xy
        for piece, path in _runs(text):
            font = _font(path, self.size)
            self.draw.text((x, y), piece, fill=fill, font=font)
            x += self.draw.textlength(piece, font=font)

    def right(self, x_right: float, y: float, text: str, fill: str = "black") -> None:
        """Right-aligned at `x_right`: table columns line up whatever the glyph widths."""
        self.text((x_right - self.length(text), y), text, fill)
