"""Stage 1, generate: class prompts -> PNG images + manifest.jsonl, with Stable Diffusion.

Every image is fixed by (global seed, class, index within class, attempt): it has its own
seed and its own CPU generator, and batches are always padded to `batch_size`, so an image's
bytes do not depend on shard count, resume or order. Each PNG carries its own record in a
text chunk, so a run killed at any moment is resumed from the files alone.

Outputs (DataLayout): the PNGs, parts/part-I-of-N.jsonl (the records one `--shard I/N` run
made: its done marker), manifest.jsonl (every record of every part that fits the config,
status "ok"), dropped.jsonl (images the safety checker flagged on every attempt).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from synthflux.config import PipelineConfig
from synthflux.diffusion import load_pipeline, resolve_model
from synthflux.layout import DataLayout
from synthflux.progress import Progress
from synthflux.records import (
    PNG_KEY,
    ImageJob,
    ManifestRecord,
    ModelRef,
    base_record,
    image_seed,
    merge_manifest,
    part_records,
    plan_images,
    read_manifest,
    record_matches,
    verified_record,
)
from synthflux.stages import ShardState, Stage, StageState
from synthflux.storage import (
    ShardSpec,
    file_lock,
    hold_point,
    remove_stale_temps,
    sha256_bytes,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)

log = logging.getLogger("synthflux")


@dataclass
class GenerateSummary:
    shard: str
    planned: int = 0
    reused: int = 0
    generated: int = 0
    regenerated_flagged: int = 0
    dropped: int = 0
    remaining: int = 0
    manifest_images: int = 0
    manifest_complete: bool = False
    seconds: float = 0.0
    images_per_s: float = 0.0
    per_class: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.manifest_complete

    def lines(self) -> list[str]:
        made = (
            f"{self.generated} generated in {self.seconds:.1f}s ({self.images_per_s:.2f} img/s)"
            if self.generated
            else "0 generated (nothing to do)"
        )
        out = [
            f"shard {self.shard}: {self.planned} images planned, {self.reused} already done, {made}"
        ]
        if self.regenerated_flagged or self.dropped:
            out.append(
                f"safety checker: {self.regenerated_flagged} regenerated, {self.dropped} dropped"
            )
        if self.remaining:
            out.append(f"{self.remaining} images left: re-run to continue")
        state = "complete" if self.manifest_complete else "incomplete"
        out.append(f"manifest: {self.manifest_images} images ({state}); per class {self.per_class}")
        return out


def run(
    cfg: PipelineConfig, *, shard: ShardSpec | None = None, limit: int | None = None
) -> GenerateSummary:
    """Make this shard's missing images, then refresh the manifest. Safe to re-run."""
    shard = shard or ShardSpec()
    layout = DataLayout(cfg.data_root)
    # 1. plan: this shard's images, and the exact model they are made with
    jobs = [j for j in plan_images(cfg) if shard.owns(j.id)]
    summary = GenerateSummary(shard=str(shard), planned=len(jobs))
    model = resolve_model(cfg)
    # 2. verify what exists: a resume hashes every file
    if layout.generated.is_dir():
        remove_stale_temps(layout.generated)  # left by a killed run
    done, todo = _scan(jobs, cfg, model, layout)
    summary.reused = len(done)
    if limit is not None:
        summary.remaining = max(len(todo) - limit, 0)
        todo = todo[:limit]
    # 3. make the rest; the part file is written even on Ctrl-C, so nothing made is lost
    start = time.monotonic()
    try:
        if todo:
            log.info(
                "generate: %d images to make with %s (%s)", len(todo), model.name, model.scheduler
            )
            _make(load_pipeline(cfg, model), cfg, model, layout, todo, done, summary)
    finally:
        write_jsonl_atomic(layout.part(shard), [done[k] for k in sorted(done)])  # type: ignore[misc]
    summary.seconds = time.monotonic() - start
    summary.images_per_s = summary.generated / summary.seconds if summary.seconds else 0.0
    # 4. merge every shard's part into the manifest
    with file_lock(layout.manifest_lock):
        merged = merge_manifest(cfg, layout, model)
    summary.manifest_images, summary.manifest_complete, summary.per_class = merged
    write_json_atomic(
        layout.stage_marker("generate"),
        {
            "stage": "generate",
            "shard": str(shard),
            "seconds": round(summary.seconds, 3),
            "images": summary.generated,
            "complete": summary.manifest_complete,
        },
    )
    return summary


def _scan(
    jobs: list[ImageJob], cfg: PipelineConfig, model: ModelRef, layout: DataLayout
) -> tuple[dict[int, ManifestRecord], list[ImageJob]]:
    """Split this shard's jobs into those already done (verified) and those still to make."""
    known = part_records(layout)
    done: dict[int, ManifestRecord] = {}
    todo: list[ImageJob] = []
    with Progress("verify existing", len(jobs)) as progress:
        for job in jobs:
            rec = verified_record(job, known.get(job.id), cfg, model, layout)
            if rec is None:
                todo.append(job)
            else:
                done[job.id] = rec
            progress.update()
    return done, todo


# --- making images -----------------------------------------------------------------------


@dataclass
class _Pending:
    job: ImageJob
    attempt: int = 0
    flagged_seeds: list[int] = field(default_factory=list)


def _make(
    pipe: Any,
    cfg: PipelineConfig,
    model: ModelRef,
    layout: DataLayout,
    todo: list[ImageJob],
    done: dict[int, ManifestRecord],
    summary: GenerateSummary,
) -> None:
    """The batch loop: the GPU denoises batch k+1 while the writer thread saves batch k."""
    batch_size = cfg.generate.batch_size
    queue: deque[_Pending] = deque(_Pending(j) for j in todo)
    in_flight: deque[Future[ManifestRecord]] = deque()

    def collect(max_in_flight: int) -> None:
        while len(in_flight) > max_in_flight:
            rec = in_flight.popleft().result()
            done[rec["id"]] = rec

    writer_pool = ThreadPoolExecutor(1, initializer=_lower_priority)
    with Progress("generate", len(todo)) as progress, writer_pool as writer:
        while queue:
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            seeds = [image_seed(cfg.seed, p.job.class_name, p.job.index, p.attempt) for p in batch]
            pixels, flags = _denoise(pipe, cfg, batch, seeds)
            for item, seed, img, flagged in zip(batch, seeds, pixels, flags, strict=False):
                record: ManifestRecord = {
                    **base_record(item.job, cfg, model),
                    "seed": seed,
                    "attempt": item.attempt,
                    "flagged_seeds": item.flagged_seeds,
                }
                if flagged:
                    _handle_flagged(cfg, item, seed, record, queue, done, summary, progress)
                    continue
                in_flight.append(writer.submit(_write_image, layout, img, record))
                summary.generated += 1
                progress.update()
            collect(max_in_flight=2 * batch_size)
        collect(max_in_flight=0)


def _denoise(
    pipe: Any, cfg: PipelineConfig, batch: list[_Pending], seeds: list[int]
) -> tuple[np.ndarray, list[bool]]:
    """One pipeline call: uint8 (n, H, W, 3) pixels and the safety checker's flags."""
    import torch

    gen = cfg.generate
    # Pad to a fixed batch shape: kernels then compute each image identically.
    pad = gen.batch_size - len(batch)
    prompts = [p.job.prompt for p in batch] + [batch[-1].job.prompt] * pad
    negatives = [p.job.negative_prompt or "" for p in batch] + [""] * pad
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds + seeds[-1:] * pad]
    result = pipe(
        prompt=prompts,
        negative_prompt=negatives if any(negatives) else None,
        num_inference_steps=gen.steps,
        guidance_scale=gen.guidance_scale,
        width=gen.width,
        height=gen.height,
        generator=generators,
        output_type="np",
    )
    images = result.images[: len(batch)]
    flags = getattr(result, "nsfw_content_detected", None) or [False] * len(batch)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), list(flags)


def to_png(pixels: np.ndarray, record: ManifestRecord | dict[str, Any]) -> bytes:
    """The PNG of `pixels` with `record` in its text chunk (the same bytes every time)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write_image(layout: DataLayout, pixels: np.ndarray, record: ManifestRecord) -> ManifestRecord:
    """Runs on the writer thread: encode, hash and write one PNG; return its full record."""
    data = to_png(pixels, record)
    # No fsync per image: a resume hashes or fully decodes every PNG, so a file torn by a
    # power cut is made again; fsync would only slow the writer on network file systems.
    write_bytes_atomic(layout.image(record["file"]), data, durable=False)
    hold_point("image")
    return {**record, "status": "ok", "sha256": sha256_bytes(data)}


def _lower_priority() -> None:
    """The writer thread yields the CPU to denoising (on a CPU-only run they share cores)."""
    with contextlib.suppress(AttributeError, OSError):  # per-thread nice is Linux-only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _handle_flagged(
    cfg: PipelineConfig,
    item: _Pending,
    seed: int,
    record: ManifestRecord,
    queue: deque[_Pending],
    done: dict[int, ManifestRecord],
    summary: GenerateSummary,
    progress: Progress,
) -> None:
    """A flagged image is never written: retry with the next derived seed, or drop it."""
    flagged = [*item.flagged_seeds, seed]
    if cfg.generate.on_flagged == "regenerate" and item.attempt + 1 < cfg.generate.max_attempts:
        summary.regenerated_flagged += 1
        queue.append(_Pending(item.job, item.attempt + 1, flagged))
        return
    log.warning("generate: %s flagged by the safety checker, dropped", item.job.name)
    done[item.job.id] = {**record, "flagged_seeds": flagged, "status": "dropped", "sha256": None}
    summary.dropped += 1
    progress.update()


# --- done-ness -----------------------------------------------------------------------------

MODEL_KEYS = ("model_revision", "scheduler")  # record fields status cannot know cheaply


def state(cfg: PipelineConfig, n: int) -> StageState:
    """Images done per task of n, by the records' rule; complete once the manifest is merged."""
    layout = DataLayout(cfg.data_root)
    records = part_records(layout)
    # The stage's own record, less the two fields that need the model loaded to know.
    model = ModelRef(path="", name=cfg.generate.model, revision="", scheduler="")
    shards = [ShardState(i, 0, 0) for i in range(n)]
    made: set[int] = set()  # ids with an image (not dropped): what the manifest must list
    for job in plan_images(cfg):
        task = shards[job.id % n]
        task.total += 1
        rec = records.get(job.id)
        if rec is None:
            continue
        if not record_matches(rec, base_record(job, cfg, model), cfg.seed, ignore=MODEL_KEYS):
            continue  # made under another config: generate will make it again
        if rec.get("status") == "dropped":
            task.done += 1
        elif layout.image(job.file).is_file():
            task.done += 1
            made.add(job.id)
    if not all(s.complete for s in shards):
        return StageState("generate", shards, False)
    # A task killed between writing its part and merging leaves the manifest behind.
    merged = layout.manifest.is_file() and {r["id"] for r in read_manifest(layout)} == made
    return StageState("generate", shards, merged, "" if merged else "manifest not merged yet")


STAGE = Stage("generate", run, state, sharded=True, resumes=True, unit="images", product="images")
