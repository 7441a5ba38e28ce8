"""The deterministic, streamed `.npz` writer behind every preprocessed shard.

Rows arrive one image at a time as (C, H, W) float32 arrays; they are buffered in blocks and
appended with npy-append-array to a private temp `.npy`, which is then packed into a stored
(uncompressed, like np.savez) zip with fixed timestamps and renamed into place. Memory stays
at one block, and the same rows always give the same bytes.
"""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

import numpy as np
from npy_append_array import NpyAppendArray

from synthflux.storage import atomic_write, temp_path

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: identical inputs give identical bytes
APPEND_ROWS = 64  # rows buffered before each append to the temporary .npy


class ShardWriter:
    """`with ShardWriter(rows_file, (C, H, W)) as w: w.append(row) ...; w.finish(npz, ...)`."""

    def __init__(self, rows_file: Path, shape: tuple[int, int, int]) -> None:
        # Private to this writer: two processes on one shard never share it; a dead one's is
        # swept by storage.remove_stale_temps.
        self.tmp = temp_path(rows_file)
        self.block = np.empty((*shape, APPEND_ROWS), np.float32, order="F")
        self.filled = 0
        self.rows = 0
        self.npy = NpyAppendArray(str(self.tmp), rewrite_header_on_append=False)

    def append(self, pixels: np.ndarray) -> None:
        self.block[..., self.filled] = pixels
        self.filled += 1
        self.rows += 1
        if self.filled == APPEND_ROWS:
            self.npy.append(_as_whcn(self.block))
            self.filled = 0

    def finish(self, npz: Path, **small: np.ndarray) -> None:
        """Pack the rows as `images` beside the `small` arrays into `npz`, atomically."""
        if self.filled or not self.rows:  # an empty shard still gets its (W, H, C, 0) header
            self.npy.append(_as_whcn(self.block[..., : self.filled]))
        self.npy.close()
        _pack_npz(npz, self.tmp, **small)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.npy.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _as_whcn(block: np.ndarray) -> np.ndarray:
    """(C, H, W, n) Fortran-order buffer -> the (W, H, C, n) Fortran-order rows it holds.

    Per image, (C, H, W) C-order and (W, H, C) Fortran order are the same bytes.
    """
    c, h, w, n = block.shape
    rows = np.ascontiguousarray(block.transpose(3, 0, 1, 2))  # (n, C, H, W) C order
    whcn: np.ndarray = rows.reshape(n, c, h, w).T  # (W, H, C, n) Fortran order, no copy
    return whcn


def _pack_npz(path: Path, images_npy: Path, **small: np.ndarray) -> None:
    """Write an .npz (stored, like np.savez) streaming the big array from its .npy file."""
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        entries: list[tuple[str, np.ndarray | None]] = [("images.npy", None)]
        entries += [(f"{n}.npy", a) for n, a in small.items()]
        for arcname, array in entries:
            info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as dst:
                if array is None:
                    with open(images_npy, "rb") as src:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                else:
                    np.lib.format.write_array(dst, array, allow_pickle=False)
