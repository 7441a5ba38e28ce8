"""Images as the classifier will see them: decode, orient, convert, resize, normalise.

`load_image` does one; `Decoder` does many in a process pool, in order. Used by preprocess
(every shard row) and its previews. Anything that cannot be used raises `Rejected` with a
one-line reason, which preprocess records in rejects.jsonl.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synthflux.config import PreprocessConfig
from synthflux.errors import DataError, Rejected

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
            im: Image.Image = Image.open(io.BytesIO(data))
            _check_name(path, im.format)
            im.seek(0)  # animations: the first frame
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation; skip the copy otherwise
                im = ImageOps.exif_transpose(im)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected(f"decompression bomb: more than max_pixels = {cfg.max_pixels}") from None
    except UnidentifiedImageError:
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
    unit: np.ndarray = np.clip(np.asarray(im, dtype=np.float32) / scale, 0.0, 1.0)
    return unit


def preview(path: Path, cfg: PreprocessConfig) -> Image.Image:
    """The image as the model sees it, denormalised to 8 bits and upscaled 4x for a person."""
    mean = np.asarray(cfg.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(-1, 1, 1)
    chw = load_image(path, None, cfg) * std + mean  # (C, H, W) in [0, 1]
    pixels = (np.clip(chw, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(pixels[0] if cfg.channels == 1 else pixels.transpose(1, 2, 0))
    return im.resize((cfg.width * 4, cfg.height * 4), Image.Resampling.NEAREST)


# --- many images, in a process pool ---------------------------------------------------------

DecodeTask = tuple[str | None, str | None]  # (path or None if refused, expected sha256)
DecodeResult = tuple[np.ndarray | None, str | None]  # (pixels, or None and the reason)


def _worker(task: DecodeTask) -> DecodeResult:
    path, sha = task
    if path is None:
        return None, "file path points outside DATA/generated (refused)"
    try:
        return load_image(Path(path), sha, _WORKER_CFG), None
    except Rejected as e:
        return None, str(e)


_WORKER_CFG: PreprocessConfig


def _init_worker(cfg: PreprocessConfig, parent: int | None = None) -> None:
    global _WORKER_CFG
    _WORKER_CFG = cfg
    if parent is not None:
        # Ctrl-C reaches the whole process group: the parent stops the workers itself, so
        # they neither print tracebacks nor die holding the pool's queue lock.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, OOM) would wait for tasks forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class Decoder:
    """`with Decoder(cfg, workers) as decode: decode(tasks)` -> results in task order."""

    def __init__(self, cfg: PreprocessConfig, workers: int) -> None:
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # fork starts workers fastest, but must not copy a process whose torch threads run.
            ctx = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
            # concurrent.futures, not multiprocessing.Pool: a worker killed (e.g. out of
            # memory) raises BrokenProcessPool here instead of hanging the run forever.
            self.pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, os.getpid())
            )
        _init_worker(cfg)

    def __call__(self, tasks: list[DecodeTask]) -> Iterator[DecodeResult]:
        results = self.pool.map(_worker, tasks, chunksize=8) if self.pool else map(_worker, tasks)
        try:
            yield from results
        except BrokenProcessPool:
            raise DataError(
                "a preprocess worker died (out of memory? try fewer --workers); "
                "re-run to resume from the last finished shard"
            ) from None

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.pool is None:
            return
        if exc_type is not None:  # interrupted or failed: stop the workers, do not wait on them
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
