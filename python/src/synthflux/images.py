"""One image, as the classifier will see it: decode, orient, convert, resize, normalise.

Used by preprocess (every shard row) and its previews. Anything that cannot be used raises
`Rejected` with a one-line reason, which preprocess records in rejects.jsonl.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from synthflux.config import PreprocessConfig
from synthflux.errors import Rejected

FORMAT_EXTENSIONS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}, "WEBP": {".webp"}, "GIF": {".gif"}}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(path: Path, expected_sha256: str | None, cfg: PreprocessConfig) -> np.ndarray:
    """Decode, orient, convert, resize and normalise one image to a (C, H, W) float32 array.

    In memory a C-order (C, H, W) block is exactly the Fortran-order (W, H, C) block one image
    occupies in the shard, so rows are appended without a transpose copy.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected("file not found") from None
    except OSError as e:
        raise Rejected(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise Rejected("empty file (0 bytes)")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise Rejected("sha256 differs from the manifest (file changed since generation)")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_name(path, im.format)
            im.seek(0)  # animations: the first frame
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation; skip the copy otherwise
                im = ImageOps.exif_transpose(im)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected(f"decompression bomb: more than max_pixels = {cfg.max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(
            f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    pixels = _to_unit_range(_fit(_convert(im, cfg.channels), cfg), im.mode)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[None], cfg.channels, axis=0)
    else:
        pixels = pixels.transpose(2, 0, 1)
    mean = np.asarray(cfg.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def _check_name(path: Path, fmt: str | None) -> None:
    allowed = FORMAT_EXTENSIONS.get(fmt or "")
    if allowed is not None and path.suffix.lower() not in allowed:
        raise Rejected(f"wrongly named: the file is {fmt} but named {path.suffix or '(no suffix)'}")


def _convert(im: Image.Image, channels: int) -> Image.Image:
    """To L / RGB (8-bit) or F (16-bit sources keep their precision); alpha over black."""
    if im.mode in SIXTEEN_BIT_MODES:
        return im.convert("F")  # grayscale; replicated to 3 channels after resizing if asked
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def _fit(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    size = (cfg.width, cfg.height)
    method = getattr(Image.Resampling, cfg.resample.upper())
    if cfg.aspect == "crop":
        return ImageOps.fit(im, size, method)
    if cfg.aspect == "pad":
        scale = 65535 if im.mode == "F" else 255
        color: Any = (
            cfg.pad_value * scale if im.mode in ("L", "F") else (round(cfg.pad_value * 255),) * 3
        )
        if im.mode == "L":
            color = round(color)
        return ImageOps.pad(im, size, method, color=color)
    return im.resize(size, method, reducing_gap=3.0)


def _to_unit_range(im: Image.Image, source_mode: str) -> np.ndarray:
    scale = 65535.0 if im.mode == "F" and source_mode in SIXTEEN_BIT_MODES else 255.0
    return np.clip(np.asarray(im, dtype=np.float32) / scale, 0.0, 1.0)
