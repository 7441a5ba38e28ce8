"""generate: class prompts -> PNG images + manifest.jsonl, with Stable Diffusion.

Every image is fixed by (global seed, class, index within class, attempt): it has its own
seed and its own CPU generator, and batches are always padded to `batch_size`, so an image's
bytes do not depend on shard count, resume or order. Each PNG carries its own record in a
text chunk, so a run killed at any moment is resumed from the files alone.

Outputs (DataLayout): the PNGs, parts/part-I-of-N.jsonl (the records one `--shard I/N` run
made: its done marker), manifest.jsonl (every record of every part that fits the config,
status "ok"), dropped.jsonl (images the safety checker flagged on every attempt).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthflux import devices, lineage
from synthflux.config import PipelineConfig
from synthflux.diffusion import (
    guidance_argument,
    kept_pipeline,
    load_pipeline,
    model_prompts,
    resolve_model,
)
from synthflux.layout import DataLayout
from synthflux.lora_fit import class_adapter, load_class_adapters
from synthflux.pixel_diffusion import sample
from synthflux.png_writer import lower_priority, write_image
from synthflux.progress import Progress
from synthflux.realguide import init_image
from synthflux.records import (
    Batch,
    ImageJob,
    ManifestRecord,
    ModelRef,
    base_record,
    image_seed,
    merge_manifest,
    part_records,
    plan_batches,
    plan_images,
    plan_key,
    read_manifest,
    verified_record,
)
from synthflux.stages import Option, ShardState, Stage, StageState, at_least, shard_option
from synthflux.storage import (
    ShardSpec,
    file_lock,
    remove_stale_temps,
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
    if cfg.generate.devices is not None:
        return _on_devices(cfg, shard, limit)
    layout = cfg.layout
    lineage.require(cfg, "finetune")  # with [finetune]: the fitted model, current
    # 1. plan: this shard's batches, and the exact model they are made with
    batches = owned_batches(cfg, shard)
    summary = GenerateSummary(shard=str(shard), planned=sum(len(b.jobs) for b in batches))
    model = resolve_model(cfg)
    # 2. verify what exists (a resume hashes every file); a partly made batch is made again
    if layout.generated.is_dir():
        remove_stale_temps(layout.generated)  # left by a killed run
    done, todo = _scan(batches, cfg, model, layout)
    summary.reused = len(done)
    todo, summary.remaining = _limited(todo, limit)
    # 3. make the rest; the part file is written even on Ctrl-C, so nothing made is lost
    start = time.monotonic()
    try:
        if todo:
            images = sum(len(b.jobs) for b in todo)
            log.info(
                "generate: %d images to make with %s (%s)", images, model.name, model.scheduler
            )
            pipe = kept_pipeline(cfg, model, lambda: _load(cfg, model))
            _make(pipe, cfg, model, layout, todo, done, summary)
    finally:
        write_jsonl_atomic(layout.part(shard), [done[k] for k in sorted(done)])  # type: ignore[misc]
    summary.seconds = time.monotonic() - start
    summary.images_per_s = summary.generated / summary.seconds if summary.seconds else 0.0
    _publish(cfg, model, summary, shard)
    return summary


def _publish(
    cfg: PipelineConfig, model: ModelRef, summary: GenerateSummary, shard: ShardSpec
) -> None:
    """Merge every shard's part into the manifest; stage.json says for which plan."""
    layout = cfg.layout
    with file_lock(layout.manifest_lock):
        merged = merge_manifest(cfg, layout, model)
        _remove_orphans(cfg, layout)
        summary.manifest_images, summary.manifest_complete, summary.per_class = merged
        lineage.record(cfg, "generate", key=plan_key(cfg), seconds=summary.seconds,
                       outputs=[layout.manifest], complete=summary.manifest_complete,
                       facts={"shard": str(shard), "images": summary.generated})  # fmt: skip


def _on_devices(cfg: PipelineConfig, shard: ShardSpec, limit: int | None) -> GenerateSummary:
    """One worker per device makes this shard's images (each verifies what it finds, and
    merges); then this process merges their parts once more and sums what they made."""
    lineage.require(cfg, "finetune")
    start = time.monotonic()
    shares, left = ({}, 0) if limit is None else _limit_shares(cfg, shard, limit)

    def options(sub: ShardSpec) -> dict[str, int] | None:
        if limit is None:
            return {}
        return {"limit": shares[sub.index]} if shares.get(sub.index) else None

    made = devices.spread("generate", cfg, shard, "generate", options)
    planned = sum(len(b.jobs) for b in owned_batches(cfg, shard))
    summary = GenerateSummary(shard=str(shard), planned=planned)
    for name in ("generated", "regenerated_flagged", "dropped", "remaining"):
        setattr(summary, name, sum(m[name] for m in made))
    if limit is not None:  # (the batches no worker took; theirs are among them)
        summary.remaining = left
    summary.reused = planned - summary.generated - summary.dropped - summary.remaining
    summary.seconds = time.monotonic() - start
    summary.images_per_s = summary.generated / summary.seconds if summary.seconds else 0.0
    _publish(cfg, resolve_model(cfg), summary, shard)
    return summary


def _limit_shares(cfg: PipelineConfig, shard: ShardSpec, limit: int) -> tuple[dict[int, int], int]:
    """--limit K over the workers: the batches one process would take (whole batches until
    K new images), as images per worker's shard index (a worker with none is not started);
    and the images left for later."""
    count = len(devices.resolve(cfg.generate.devices or []))
    owned = [(g, b) for g, b in enumerate(plan_batches(cfg)) if shard.owns(g)]
    _, todo = _scan([b for _, b in owned], cfg, resolve_model(cfg), cfg.layout)
    position = {id(b): g for g, b in owned}
    taken, left = _limited(todo, limit)
    shares: dict[int, int] = {}
    for batch in taken:
        d = (position[id(batch)] // shard.count) % count
        sub = devices.sub_shard(shard, d, count).index
        shares[sub] = shares.get(sub, 0) + len(batch.jobs)
    return shares, left


def _remove_orphans(cfg: PipelineConfig, layout: DataLayout) -> None:
    """Images of no planned job (a class that shrank or was renamed) and emptied folders:
    what a fresh run of this config would not have."""
    planned = {job.file for job in plan_images(cfg)}
    for png in layout.generated.glob("*/*.png"):
        rel = png.relative_to(layout.generated).as_posix()
        if rel not in planned and png.is_file():
            png.unlink()
            log.info("generate: removed %s (no longer in the config)", rel)
    for folder in layout.generated.iterdir():
        if folder.is_dir() and folder != layout.parts and not any(folder.iterdir()):
            folder.rmdir()


def owned_batches(cfg: PipelineConfig, shard: ShardSpec) -> list[Batch]:
    """The canonical batches `--shard I/N` makes: every N-th, so shards take whole batches."""
    return [b for g, b in enumerate(plan_batches(cfg)) if shard.owns(g)]


def _scan(
    batches: list[Batch], cfg: PipelineConfig, model: ModelRef, layout: DataLayout
) -> tuple[dict[int, ManifestRecord], list[Batch]]:
    """Split this shard's batches into images already done (verified) and batches to make."""
    known = part_records(layout)
    done: dict[int, ManifestRecord] = {}
    todo: list[Batch] = []
    with Progress("verify existing", sum(len(b.jobs) for b in batches)) as progress:
        for batch in batches:
            recs = [verified_record(j, known.get(j.id), cfg, model, layout) for j in batch.jobs]
            progress.update(len(recs))
            if all(r is not None for r in recs):
                done.update((r["id"], r) for r in recs if r is not None)
            else:  # remade whole, so each image is made in the same call as in one run
                todo.append(batch)
    return done, todo


def _limited(todo: list[Batch], limit: int | None) -> tuple[list[Batch], int]:
    """With --limit K: whole batches until K new images are reached; and the images left."""
    if limit is None:
        return todo, 0
    taken, images = [], 0
    for batch in todo:
        if images >= limit:
            break
        taken.append(batch)
        images += len(batch.jobs)
    return taken, sum(len(b.jobs) for b in todo) - images


# --- making images -----------------------------------------------------------------------


@dataclass
class _Pending:
    job: ImageJob
    attempt: int = 0
    flagged_seeds: list[int] = field(default_factory=list)


def _load(cfg: PipelineConfig, model: ModelRef) -> Any:
    pipe = load_pipeline(cfg, model)
    if cfg.finetune is not None and not cfg.pixel_model:  # a LoRA per class, by label
        load_class_adapters(pipe, cfg)
    return pipe


def _make(
    pipe: Any,
    cfg: PipelineConfig,
    model: ModelRef,
    layout: DataLayout,
    todo: list[Batch],
    done: dict[int, ManifestRecord],
    summary: GenerateSummary,
) -> None:
    """The batch loop: the GPU denoises batch k+1 while the writer thread saves batch k."""
    queue: deque[list[_Pending]] = deque([_Pending(j) for j in b.jobs] for b in todo)
    seen = model_prompts(pipe, {p.job.prompt for batch in queue for p in batch})
    in_flight: deque[Future[ManifestRecord]] = deque()
    try:
        writer_pool = ThreadPoolExecutor(1, initializer=lower_priority)
        total = sum(len(b) for b in queue)
        with Progress("generate", total) as progress, writer_pool as writer:
            while queue:
                batch = queue.popleft()
                seeds = [
                    image_seed(cfg.seed, p.job.class_name, p.job.index, p.attempt) for p in batch
                ]
                pixels, flags = _denoise(pipe, cfg, batch, seeds)
                for item, seed, img, flagged in zip(batch, seeds, pixels, flags, strict=False):
                    record: ManifestRecord = {
                        **base_record(item.job, cfg, model),
                        "seed": seed,
                        "attempt": item.attempt,
                        "flagged_seeds": item.flagged_seeds,
                        "model_prompt": seen[item.job.prompt],
                    }
                    if flagged:
                        _handle_flagged(cfg, item, seed, record, queue, done, summary, progress)
                        continue
                    in_flight.append(writer.submit(write_image, layout, img, record))
                    summary.generated += 1
                    progress.update()
                _collect(in_flight, done, keep=2 * cfg.generate.batch_size)
        _collect(in_flight, done, keep=0)  # raises the writer's error, if it had one
    finally:  # the writer has finished: keep the record of every image it wrote, even on Ctrl-C
        for future in in_flight:
            if future.done() and future.exception() is None:
                rec = future.result()
                done[rec["id"]] = rec


def _collect(
    in_flight: deque[Future[ManifestRecord]], done: dict[int, ManifestRecord], keep: int
) -> None:
    while len(in_flight) > keep:
        rec = in_flight.popleft().result()
        done[rec["id"]] = rec


def _denoise(
    pipe: Any, cfg: PipelineConfig, batch: list[_Pending], seeds: list[int]
) -> tuple[np.ndarray, list[bool]]:
    """One pipeline call: uint8 (n, H, W, 3) pixels and the safety checker's flags."""
    import torch

    gen = cfg.generate
    # Pad to a fixed batch shape: kernels then compute each image identically.
    pad = gen.batch_size - len(batch)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds + seeds[-1:] * pad]
    scales = [p.job.guidance_scale for p in batch] + [batch[-1].job.guidance_scale] * pad
    if cfg.pixel_model:  # sampled by class label: no prompts, no safety checker
        labels = [p.job.label for p in batch] + [batch[-1].job.label] * pad
        pixels = sample(pipe, labels, generators, scales, gen.steps, (gen.width, gen.height))
        return pixels[: len(batch)], [False] * len(batch)
    if cfg.finetune is not None:  # a canonical batch is one class: its LoRA alone
        pipe.set_adapters([class_adapter(batch[0].job.label)])
    prompts = [p.job.prompt for p in batch] + [batch[-1].job.prompt] * pad
    negatives = [p.job.negative_prompt or "" for p in batch] + [""] * pad
    starts = [p.job.parent for p in batch if p.job.parent is not None]
    if starts:  # img2img: the real images to start from, and how far to noise them
        images = [init_image(cfg, parent) for parent in starts + starts[-1:] * pad]
        shape: dict[str, Any] = {"image": images, "strength": gen.strength}
    else:
        shape = {"width": gen.width, "height": gen.height}
    result = pipe(
        prompt=prompts,
        negative_prompt=negatives if any(negatives) else None,
        num_inference_steps=gen.steps,
        guidance_scale=guidance_argument(scales),
        generator=generators,
        output_type="np",
        **shape,
    )
    images = result.images[: len(batch)]
    flags = getattr(result, "nsfw_content_detected", None) or [False] * len(batch)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), list(flags)


def _handle_flagged(
    cfg: PipelineConfig,
    item: _Pending,
    seed: int,
    record: ManifestRecord,
    queue: deque[list[_Pending]],
    done: dict[int, ManifestRecord],
    summary: GenerateSummary,
    progress: Progress,
) -> None:
    """A flagged image is never written: retry with the next derived seed, or drop it."""
    flagged = [*item.flagged_seeds, seed]
    if cfg.generate.on_flagged == "regenerate" and item.attempt + 1 < cfg.generate.max_attempts:
        summary.regenerated_flagged += 1
        # A batch of its own, at position 0: the same call whichever run makes it.
        queue.append([_Pending(item.job, item.attempt + 1, flagged)])
        return
    log.warning("generate: %s flagged by the safety checker, dropped", item.job.name)
    done[item.job.id] = {**record, "flagged_seeds": flagged, "status": "dropped", "sha256": None}
    summary.dropped += 1
    progress.update()


# --- done-ness -----------------------------------------------------------------------------


def state(cfg: PipelineConfig, n: int) -> StageState:
    """Images done per task of n, by the rule a re-run uses (every file verified), with the
    model resolved from local files only; complete once the manifest lists exactly them."""
    layout = cfg.layout
    model = resolve_model(cfg, offline=True)
    known = part_records(layout)
    shards = [ShardState(i, 0, 0) for i in range(n)]
    made: dict[int, str | None] = {}  # id -> sha256 of every image (not dropped) made
    batches = plan_batches(cfg)
    with Progress("verify existing", sum(len(b.jobs) for b in batches)) as progress:
        for g, batch in enumerate(batches):
            task = shards[g % n]
            task.total += len(batch.jobs)
            progress.update(len(batch.jobs))
            if model is None:
                continue
            recs = [verified_record(j, known.get(j.id), cfg, model, layout) for j in batch.jobs]
            if all(r is not None for r in recs):
                task.done += len(recs)
                made.update((r["id"], r["sha256"]) for r in recs if r and r["status"] == "ok")
    if model is None:
        missing = (
            "the fitted model is not there yet (finetune)"
            if cfg.finetune is not None
            else f"model {cfg.generate.model!r} not found locally"
        )
        return StageState("generate", shards, False, missing)
    if not all(s.complete for s in shards):
        return StageState("generate", shards, False)
    # A task killed between writing its part and merging leaves the manifest behind.
    listed = (
        {r["id"]: r.get("sha256") for r in read_manifest(layout)}
        if layout.manifest.is_file()
        else None
    )
    if listed != made:
        return StageState("generate", shards, False, "manifest not merged yet")
    why = lineage.problem(cfg, "generate")  # the manifest as stage.json recorded it
    return StageState("generate", shards, why is None, why or "")


STAGE = Stage(
    "generate", run, key=plan_key, folder=lambda layout: layout.generated,
    results=lambda cfg: [cfg.layout.manifest], needs=("finetune",), state=state, sharded=True,
    resumes=True,
    uses_gpu=True, spreads=True, unit="images", product="images", applies=lambda cfg: cfg.generates,
    help="prompts -> PNG images + manifest (the synthetic source)",
    description="Generate every class's images with the configured diffusion model into "
    "DATA/generated/<class>/ and write DATA/generated/manifest.jsonl. Re-running skips "
    "images already present and verified, so an interrupted run resumes.",
    options=(
        shard_option("make only part I of N: batch g of the plan goes to part g %% N; the N "
                     "parts together equal an unsharded run, byte for byte on CPU"),
        Option(("--limit",), {"type": at_least(1), "metavar": "K",
                              "help": "make at most K new images in this run, then stop"}),
    ),
)  # fmt: skip
