"""Stage 2, preprocess: generated PNGs -> normalised float32 .npz shards for the classifier.

The generation manifest is streamed in order and cut into output shards of `shard_size`
records: shard k holds records [k*S, (k+1)*S) minus the rejected ones. A shard is the unit of
work, resume and `--shard I/N`; within a shard a process pool decodes images in parallel and
the rows are appended in manifest order, so the bytes never depend on the worker count.

Layout under DATA/preprocessed/ (the array layout is documented in docs/architecture.md):
    shard-00000.npz     images (W, H, C, N) float32 Fortran order, labels, ids
    shard-00000.json    the shard's done marker: its rows, rejects, sha256 (written last)
    manifest.jsonl      id -> shard, row, label, class        (when every shard is done)
    rejects.jsonl       id, file, reason for every quarantined image
    dataset.json        shape, layout, normalisation, classes, counts, sha256 per shard
    previews/           a few preprocessed images, denormalised, so a person sees the input
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from npy_append_array import NpyAppendArray
from PIL import Image, ImageOps

from synthflux.config import PipelineConfig, PreprocessConfig
from synthflux.errors import DataError
from synthflux.progress import Progress
from synthflux.storage import (
    ShardSpec,
    atomic_write,
    file_lock,
    remove_stale_temps,
    sha256_file,
    temp_path,
    write_json_atomic,
)

log = logging.getLogger("synthflux")

LAYOUT = "WHCN"  # numpy (W, H, C, N) in Fortran order == Flux's WHCN == C-order (N, C, H, W)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: identical inputs give identical bytes
APPEND_ROWS = 64  # rows buffered before each append to the temporary .npy
PREVIEWS_PER_CLASS = 4
FORMAT_EXTENSIONS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}, "WEBP": {".webp"}, "GIF": {".gif"}}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class Rejected(Exception):
    """An input image that cannot be used; its message is the one-line reason."""


# --- one image ----------------------------------------------------------------------------


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


def _worker(task: tuple[str | None, str | None]) -> tuple[np.ndarray | None, str | None]:
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
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, OOM) would wait for tasks forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


# --- one shard ----------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def preprocessed_dir(cfg: PipelineConfig) -> Path:
    return cfg.data_root / "preprocessed"


def _input_key(records: list[dict[str, Any]], cfg: PreprocessConfig) -> str:
    """What a shard's bytes depend on: its input records and the preprocessing settings."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for r in records:
        h.update(f"{r['id']}:{r['label']}:{r.get('sha256')}:{r['file']}\n".encode())
    return h.hexdigest()


def _shard_done(out: Path, k: int, key: str) -> dict[str, Any] | None:
    marker = out / f"{shard_name(k)}.json"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    npz = out / f"{shard_name(k)}.npz"
    if info.get("input_key") != key or not npz.is_file() or sha256_file(npz) != info.get("sha256"):
        return None
    return info


def _safe_path(root: Path, relative: str) -> Path | None:
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def process_shard(
    k: int,
    records: list[dict[str, Any]],
    cfg: PipelineConfig,
    images: Iterable[tuple[np.ndarray | None, str | None]],
) -> dict[str, Any]:
    """Stream one shard's decoded rows into shard-k.npz; write its marker last; return it."""
    pre = cfg.preprocess
    out = preprocessed_dir(cfg)
    name = shard_name(k)
    # Private to this writer: two processes on one shard never share it; a dead one's is swept.
    tmp_npy = temp_path(out / f"{name}.images.npy")
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    block = np.empty((pre.channels, pre.height, pre.width, APPEND_ROWS), np.float32, order="F")
    filled = 0
    with NpyAppendArray(str(tmp_npy), rewrite_header_on_append=False) as npy:
        for rec, (pixels, reason) in zip(records, images, strict=True):
            if pixels is None:
                rejects.append(
                    {"id": rec["id"], "file": rec["file"], "reason": reason, "class": rec["class"]}
                )
                continue
            block[..., filled] = pixels
            filled += 1
            row = {"id": rec["id"], "row": len(rows), "label": rec["label"], "class": rec["class"]}
            rows.append(row | {"file": rec["file"]})
            if filled == APPEND_ROWS:
                npy.append(_as_whcn(block))
                filled = 0
        if filled or not rows:
            npy.append(_as_whcn(block[..., :filled]))
    npz = out / f"{name}.npz"
    _pack_npz(
        npz,
        tmp_npy,
        labels=np.array([r["label"] for r in rows], np.int64),
        ids=np.array([r["id"] for r in rows], np.int64),
    )
    tmp_npy.unlink()
    info = {
        "shard": k,
        "file": npz.name,
        "count": len(rows),
        "sha256": sha256_file(npz),
        "input_key": _input_key(records, pre),
        "rows": rows,
        "rejects": rejects,
    }
    write_json_atomic(out / f"{name}.json", info)
    return info


def _as_whcn(block: np.ndarray) -> np.ndarray:
    """(C, H, W, n) Fortran-order buffer -> the (W, H, C, n) Fortran-order rows it holds.

    Per image, (C, H, W) C-order and (W, H, C) Fortran order are the same bytes.
    """
    c, h, w, n = block.shape
    rows = np.ascontiguousarray(block.transpose(3, 0, 1, 2))  # (n, C, H, W) C order
    return rows.reshape(n, c, h, w).T  # (W, H, C, n) Fortran order, no copy


def _pack_npz(path: Path, images_npy: Path, **small: np.ndarray) -> None:
    """Write an .npz (stored, like np.savez) streaming the big array from its .npy file."""
    with atomic_write(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        entries = [("images.npy", None)] + [(f"{n}.npy", a) for n, a in small.items()]
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


# --- the run ------------------------------------------------------------------------------


@dataclass
class PreprocessSummary:
    shard: str
    shards_total: int = 0
    shards_done: int = 0
    shards_reused: int = 0
    images: int = 0
    seconds: float = 0.0
    processed: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"shard {self.shard}: {self.shards_done} of {self.shards_total} output shards done here "
            f"({self.shards_reused} already done), {self.images} images in {self.seconds:.1f}s "
            f"({self.images_per_s:.1f} img/s)",
            f"processed per class {self.processed}; rejected per class {self.rejected}",
        ]
        if self.complete:
            out.append("dataset complete: preprocessed/dataset.json written")
        return out


def _stream_manifest(cfg: PipelineConfig) -> Iterator[dict[str, Any]]:
    path = cfg.data_root / "generated" / "manifest.jsonl"
    if not cfg.data_root.is_dir():
        raise DataError(f"data root {cfg.data_root} does not exist: run `synthflux generate` first")
    if not path.is_file():
        raise DataError(f"{path} not found: run `synthflux generate` first")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                _ = rec["id"], rec["file"], rec["label"], rec["class"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: malformed record ({e})") from None
            yield rec


def _count_records(cfg: PipelineConfig) -> int:
    """Manifest lines, counted without parsing them (the full parse streams later)."""
    next(_stream_manifest(cfg), None)  # the clear errors for a missing data root / manifest
    with open(cfg.data_root / "generated" / "manifest.jsonl", "rb") as f:
        return sum(1 for line in f if line.strip())


def _shards(cfg: PipelineConfig) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    records = _stream_manifest(cfg)
    for k in itertools.count():
        chunk = list(itertools.islice(records, cfg.preprocess.shard_size))
        if not chunk:
            return
        yield k, chunk


def shard_states(cfg: PipelineConfig) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Each output shard k with its verified done marker, or None if it is not done (yet).

    The stage's own definition of done, so `synthflux status` agrees with a re-run.
    """
    out = preprocessed_dir(cfg)
    for k, records in _shards(cfg):
        yield k, _shard_done(out, k, _input_key(records, cfg.preprocess))


def preprocess(
    cfg: PipelineConfig, shard: ShardSpec | None = None, workers: int | None = None
) -> PreprocessSummary:
    """Preprocess this process's output shards (skipping verified ones); finish the dataset."""
    shard = shard or ShardSpec()
    pre = cfg.preprocess
    workers = workers or pre.workers or os.cpu_count() or 1
    out = preprocessed_dir(cfg)
    gen_dir = cfg.data_root / "generated"
    summary = PreprocessSummary(shard=str(shard))
    n_records = _count_records(cfg)
    summary.shards_total = -(-n_records // pre.shard_size)
    mine = sum(1 for k in range(summary.shards_total) if shard.owns(k))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    start = time.monotonic()
    # fork starts workers fastest, but must not copy a process whose torch threads are running.
    ctx = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
    # concurrent.futures, not multiprocessing.Pool: a worker killed (e.g. out of memory)
    # raises BrokenProcessPool here instead of hanging the run forever.
    pool = (
        ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(pre, os.getpid())
        )
        if workers > 1
        else None
    )
    _init_worker(pre)
    verified: dict[int, dict[str, Any]] = {}  # shard -> its marker, checked in this run
    try:
        with Progress("preprocess", min(mine * pre.shard_size, n_records)) as progress:
            for k, records in _shards(cfg):
                if not shard.owns(k):
                    continue
                if (reused := _shard_done(out, k, _input_key(records, pre))) is not None:
                    verified[k] = reused
                    summary.shards_reused += 1
                    progress.update(len(records))
                    continue
                tasks = [(_input_path(gen_dir, r), r.get("sha256")) for r in records]
                results = pool.map(_worker, tasks, chunksize=8) if pool else map(_worker, tasks)
                try:
                    info = process_shard(k, records, cfg, _counted(results, progress))
                except BrokenProcessPool:
                    raise DataError(
                        "a preprocess worker died (out of memory? try fewer --workers); "
                        "re-run to resume from the last finished shard"
                    ) from None
                verified[k] = info
                summary.shards_done += 1
                summary.images += info["count"] + len(info["rejects"])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.monotonic() - start
    summary.complete = finish_dataset(cfg, summary, verified)
    return summary


def _input_path(gen_dir: Path, record: dict[str, Any]) -> str | None:
    """The image's path, or None if the manifest points outside generated/ (never opened)."""
    path = _safe_path(gen_dir, str(record["file"]))
    return str(path) if path is not None else None


def _counted(results: Iterable[Any], progress: Progress) -> Iterator[Any]:
    for r in results:
        progress.update()
        yield r


def finish_dataset(
    cfg: PipelineConfig, summary: PreprocessSummary, verified: dict[int, dict[str, Any]]
) -> bool:
    """When every shard has a valid marker, write manifest, rejects, dataset.json, previews."""
    out = preprocessed_dir(cfg)
    pre = cfg.preprocess
    counts = {name: 0 for name in cfg.class_names}
    rejected = {name: 0 for name in cfg.class_names}
    with file_lock(out / ".dataset.lock"):
        shards = []  # small per-shard facts only: the rows are streamed from the markers
        for k, records in _shards(cfg):
            # Shards this run wrote or verified are not hashed a second time.
            info = verified.get(k) or _shard_done(out, k, _input_key(records, pre))
            if info is None:
                summary.processed, summary.rejected = counts, rejected
                return False
            for r in info["rows"]:
                counts[r["class"]] += 1
            for r in info["rejects"]:
                rejected[r["class"]] += 1
            shards.append({"file": info["file"], "count": info["count"], "sha256": info["sha256"]})
        markers = [out / Path(s["file"]).with_suffix(".json").name for s in shards]
        # One pass over the markers writes both lists (markers hold every row: read them once).
        with (
            atomic_write(out / "manifest.jsonl", "w") as manifest,
            atomic_write(out / "rejects.jsonl", "w") as rejects,
        ):
            for info in _read_markers(markers):
                for r in info["rows"]:
                    manifest.write(json.dumps({**r, "shard": info["file"]}, sort_keys=True) + "\n")
                for r in info["rejects"]:
                    rejects.write(json.dumps(r, sort_keys=True) + "\n")
        for stale in out.glob("shard-[0-9]*.npz"):  # left from a larger earlier dataset
            if stale.stem[6:].isdigit() and int(stale.stem[6:]) >= len(shards):
                stale.unlink()
                stale.with_suffix(".json").unlink(missing_ok=True)
        dataset = {
            "layout": LAYOUT,
            "order": "fortran",
            "dtype": "float32",
            "width": pre.width,
            "height": pre.height,
            "channels": pre.channels,
            "shape": [pre.width, pre.height, pre.channels],
            "normalization": {
                "scale": "1/255 (1/65535 for 16-bit inputs)",
                "mean": pre.mean,
                "std": pre.std,
            },
            "preprocess": pre.model_dump(),
            "classes": cfg.class_names,
            "counts": counts,
            "rejected": rejected,
            "images": sum(counts.values()),
            "shards": shards,
        }
        _write_previews(out, _read_markers(markers), cfg)
        write_json_atomic(out / "dataset.json", dataset)
        write_json_atomic(
            out / "stage.json",
            {
                "stage": "preprocess",
                "seconds": round(summary.seconds, 3),
                "images": dataset["images"],
            },
        )
    summary.processed, summary.rejected = counts, rejected
    return True


def _read_markers(markers: list[Path]) -> Iterator[dict[str, Any]]:
    for marker in markers:
        yield json.loads(marker.read_text())


def _write_previews(out: Path, infos: Iterable[dict[str, Any]], cfg: PipelineConfig) -> None:
    """A few images per class as the model sees them (denormalised, upscaled 4x for a person).

    They are decoded again from the source PNGs with the same function as the shards, which
    keeps memory flat: no shard is loaded whole.
    """
    pre = cfg.preprocess
    wanted = {name: PREVIEWS_PER_CLASS for name in cfg.class_names}
    folder = out / "previews"
    folder.mkdir(exist_ok=True)
    mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
    for info in infos:
        for r in info["rows"]:
            if wanted[r["class"]] <= 0:
                continue
            wanted[r["class"]] -= 1
            path = _safe_path(cfg.data_root / "generated", r["file"])
            try:
                chw = load_image(path or Path(), None, pre) * std + mean  # (C, H, W) in [0, 1]
            except Rejected as e:  # the source changed since its shard was made: skip it
                log.warning("preprocess: no preview for %s: %s", r["file"], e)
                continue
            pixels = (np.clip(chw, 0, 1) * 255).round().astype(np.uint8)
            im = Image.fromarray(pixels[0] if pre.channels == 1 else pixels.transpose(1, 2, 0))
            im = im.resize((pre.width * 4, pre.height * 4), Image.Resampling.NEAREST)
            with atomic_write(folder / f"{r['class']}-{r['id']:06d}.png") as f:
                im.save(f, format="PNG")
        if not any(wanted.values()):
            return


def read_dataset(cfg: PipelineConfig) -> dict[str, Any]:
    """dataset.json, for the classify stage; a clear error if preprocessing is not complete."""
    path = preprocessed_dir(cfg) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run `synthflux preprocess` first (to completion)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); re-run `synthflux preprocess`") from None
