"""A generated image on disk: the same PNG bytes for the same pixels, with its record in a
text chunk (so a killed run is resumed from the files alone), written whole on a thread that
yields the CPU to denoising."""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from synthflux.layout import DataLayout
from synthflux.records import PNG_KEY, ManifestRecord, pixels_sha256
from synthflux.storage import hold_point, sha256_bytes, write_bytes_atomic


def to_png(pixels: np.ndarray, record: ManifestRecord | dict[str, Any]) -> bytes:
    """The PNG of `pixels` with `record` in its text chunk (the same bytes every time)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_image(layout: DataLayout, pixels: np.ndarray, record: ManifestRecord) -> ManifestRecord:
    """Runs on the writer thread: encode, hash and write one PNG; return its full record."""
    record = {**record, "pixels_sha256": pixels_sha256(pixels)}
    data = to_png(pixels, record)
    # No fsync per image: a resume hashes or fully decodes every PNG, so a file torn by a
    # power cut is made again; fsync would only slow the writer on network file systems.
    write_bytes_atomic(layout.image(record["file"]), data, durable=False)
    hold_point("image")
    return {**record, "status": "ok", "sha256": sha256_bytes(data)}


def lower_priority() -> None:
    """The writer thread yields the CPU to denoising (on a CPU-only run they share cores)."""
    with contextlib.suppress(AttributeError, OSError):  # per-thread nice is Linux-only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
