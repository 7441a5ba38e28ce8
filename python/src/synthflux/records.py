"""Image identity: which images a config asks for, their seeds, and their manifest records.

An image is fixed by (global seed, class, index within class, attempt) and the generation
settings; its record says all of that plus its file and sha256. This module holds the one
rule for "this image is already made" (`verified_record`), used by generate (resume), status
and submit alike, and the one reader of the generation manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from PIL import Image

from synthflux.config import PipelineConfig
from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.storage import read_jsonl, sha256_bytes, write_jsonl_atomic

PNG_KEY = "synthflux"  # the PNG text chunk holding an image's record

# The manifest record (generated/manifest.jsonl, parts/*.jsonl, and each PNG's text chunk
# less `sha256` and `status`). "class" is a Python keyword, hence the functional form.
ManifestRecord = TypedDict(
    "ManifestRecord",
    {
        "id": int,
        "name": str,
        "class": str,
        "label": int,
        "index": int,
        "prompt": str,
        "negative_prompt": str,
        "model": str,
        "model_revision": str,
        "scheduler": str,
        "steps": int,
        "guidance_scale": float,
        "width": int,
        "height": int,
        "file": str,
        "seed": int,
        "attempt": int,
        "flagged_seeds": list[int],
        "status": str,  # "ok" or "dropped" (flagged by the safety checker on every attempt)
        "sha256": str | None,  # of the PNG file; None when dropped
    },
    total=False,
)


@dataclass(frozen=True)
class ModelRef:
    """Where to load the model from, and what to record about it in the manifest."""

    path: str
    name: str
    revision: str
    scheduler: str


@dataclass(frozen=True)
class ImageJob:
    """One image to make; `id` is its position in the canonical (class, index) order."""

    id: int
    name: str
    class_name: str
    label: int
    index: int
    prompt: str
    negative_prompt: str

    @property
    def file(self) -> str:
        return f"{self.class_name}/{self.name}.png"


def plan_images(cfg: PipelineConfig) -> list[ImageJob]:
    jobs: list[ImageJob] = []
    for label, spec in enumerate(cfg.classes):
        prompts = spec.expanded_prompts()
        for index in range(cfg.images_for(spec)):
            prompt = prompts[index % len(prompts)]
            if cfg.style:
                prompt = f"{prompt}, {cfg.style}"
            jobs.append(
                ImageJob(
                    id=len(jobs),
                    name=f"{spec.name}-{index:06d}",
                    class_name=spec.name,
                    label=label,
                    index=index,
                    prompt=prompt,
                    negative_prompt=cfg.negative_prompt,
                )
            )
    return jobs


def image_seed(global_seed: int, class_name: str, index: int, attempt: int = 0) -> int:
    """A 63-bit seed that depends on nothing but the image's identity."""
    key = f"{global_seed}\0{class_name}\0{index}\0{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def base_record(job: ImageJob, cfg: PipelineConfig, model: ModelRef) -> ManifestRecord:
    """Everything that determines an image, except its attempt/seed and its bytes."""
    gen = cfg.generate
    return {
        "id": job.id,
        "name": job.name,
        "class": job.class_name,
        "label": job.label,
        "index": job.index,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "model": model.name,
        "model_revision": model.revision,
        "scheduler": model.scheduler,
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "width": gen.width,
        "height": gen.height,
        "file": job.file,
    }


def record_matches(
    record: ManifestRecord | dict[str, Any],
    base: ManifestRecord,
    global_seed: int,
    ignore: Sequence[str] = (),
) -> bool:
    """Whether `record` describes the image `base` asks for, with a seed of its own lineage.

    `ignore` leaves out fields the caller cannot know without loading the model.
    """
    if any(record.get(k) != v for k, v in base.items() if k not in ignore):
        return False
    attempt = record.get("attempt", -1)
    return isinstance(attempt, int) and record.get("seed") == image_seed(
        global_seed, base["class"], base["index"], attempt
    )


def embedded_record(data: bytes) -> dict[str, Any] | None:
    """The record inside a PNG we wrote, or None if the bytes are not a whole PNG of ours."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = getattr(im, "text", {}).get(PNG_KEY)  # PNG text chunks
            im.load()  # decodes every row: a truncated file fails here
        return json.loads(text) if text else None
    except Exception:
        return None


def verified_record(
    job: ImageJob,
    rec: ManifestRecord | None,
    cfg: PipelineConfig,
    model: ModelRef,
    layout: DataLayout,
) -> ManifestRecord | None:
    """The job's record if its image is already made and intact (each PNG is read once)."""
    base = base_record(job, cfg, model)
    if rec is not None and rec.get("status") == "dropped" and record_matches(rec, base, cfg.seed):
        return rec
    try:
        data = layout.image(job.file).read_bytes()
    except OSError:
        return None
    if (
        rec is not None
        and record_matches(rec, base, cfg.seed)
        and sha256_bytes(data) == rec.get("sha256")
    ):
        return rec
    # Written before a crash, not yet in a part file: trust only a whole PNG carrying our record.
    emb = embedded_record(data)
    if emb is not None and record_matches(emb, base, cfg.seed):
        return cast(ManifestRecord, {**emb, "status": "ok", "sha256": sha256_bytes(data)})
    return None


def part_records(layout: DataLayout) -> dict[int, ManifestRecord]:
    """Every record in generated/parts/ by id (a later part wins)."""
    known: dict[int, ManifestRecord] = {}
    for part in sorted(layout.parts.glob("part-*.jsonl")):
        for rec in read_jsonl(part):
            known[rec["id"]] = cast(ManifestRecord, rec)
    return known


def merge_manifest(
    cfg: PipelineConfig, layout: DataLayout, model: ModelRef
) -> tuple[int, bool, dict[str, int]]:
    """Rebuild manifest.jsonl and dropped.jsonl from every part that fits the current config.

    The caller holds layout.manifest_lock. Returns (images listed, every image accounted for,
    images per class).
    """
    jobs = plan_images(cfg)
    known = part_records(layout)
    ok: list[ManifestRecord] = []
    dropped: list[ManifestRecord] = []
    for job in jobs:
        rec = known.get(job.id)
        if rec is None or not record_matches(rec, base_record(job, cfg, model), cfg.seed):
            continue
        (dropped if rec.get("status") == "dropped" else ok).append(rec)
    write_jsonl_atomic(layout.manifest, ok)  # type: ignore[arg-type]
    write_jsonl_atomic(layout.dropped, dropped)  # type: ignore[arg-type]
    per_class: dict[str, int] = {name: 0 for name in cfg.class_names}
    for rec in ok:
        per_class[rec["class"]] += 1
    return len(ok), len(ok) + len(dropped) == len(jobs), per_class


def iter_manifest(layout: DataLayout) -> Iterator[ManifestRecord]:
    """The generation manifest, streamed; a clear error if generate never ran or a line is bad."""
    path = layout.manifest
    if not layout.root.is_dir():
        raise DataError(f"data root {layout.root} does not exist: run `synthflux generate` first")
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
            yield cast(ManifestRecord, rec)


def read_manifest(layout: DataLayout) -> list[ManifestRecord]:
    return list(iter_manifest(layout))


def count_manifest(layout: DataLayout) -> int:
    """Manifest lines, counted without parsing them (the full parse streams later)."""
    next(iter_manifest(layout), None)  # the clear errors for a missing data root / manifest
    with open(layout.manifest, "rb") as f:
        return sum(1 for line in f if line.strip())
