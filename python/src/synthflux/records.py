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
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
from PIL import Image

from synthflux import fitted
from synthflux.config import PipelineConfig
from synthflux.config_paths import identity
from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.prompts import fill, placeholders
from synthflux.realguide import Parent, parents
from synthflux.storage import read_jsonl, sha256_bytes, sha256_file, write_jsonl_atomic

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
        "batch_size": int,  # the pipeline call's shape ...
        "batch_images": int,  # ... and how many real images it held: the image's batch
        "file": str,
        "pixels_sha256": str,  # of the decoded RGB pixels: what vouches for a PNG (verified_record)
        "model_prompt": str,  # what the model read of `prompt` (its tokenizer may cut it)
        "seed": int,
        "attempt": int,
        "flagged_seeds": list[int],
        "status": str,  # "ok" or "dropped" (flagged by the safety checker on every attempt)
        "sha256": str | None,  # of the PNG file; None when dropped
        # Imported (real) images: no prompt or seed, but where they came from.
        "source": str,  # "real"
        "original": str,  # the file imported
        "original_size": int,
        "original_mtime_ns": int,
        # The filter's scores of a kept generated image (filter.py).
        "filter": dict[str, Any],
        # Real-guided images: the real image it started from, and how much it was noised.
        "parent": dict[str, Any],
        "strength": float,
        "adapters": list[str],  # LoRA and textual-inversion adapters, with their hashes
        "dtype": str,  # [generate] dtype when set (not "auto")
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
    adapters: tuple[str, ...] = ()  # "lora:<name>@<digest>", "textual_inversion:<name>@<digest>"


# An image's id is label * ID_STRIDE + index: it names the image whatever the other classes'
# counts, so growing one class never renames (and so never remakes) another's images.
ID_STRIDE = 1_000_000


@dataclass(frozen=True, slots=True)
class ImageJob:
    """One image to make: image `index` of class `label`, in batch `batch` of its class."""

    id: int
    name: str
    class_name: str
    label: int
    index: int
    prompt: str
    negative_prompt: str
    batch_images: int  # real images in its batch (the rest of the batch is padding)
    guidance_scale: float
    parent: Parent | None = None  # the real image it starts from (realguide.py)

    @property
    def file(self) -> str:
        return f"{self.class_name}/{self.name}.png"


@dataclass(frozen=True, slots=True)
class Batch:
    """One pipeline call: images [b*B, b*B + n) of one class, always padded to B.

    Batches are fixed by the config alone, and every image is always made in its own batch at
    its own position, so its bytes do not depend on sharding, resume or other classes: on a
    CPU an image's bytes depend on its position in the batch and on the batch's shape.
    """

    jobs: tuple[ImageJob, ...]


def plan_batches(cfg: PipelineConfig) -> list[Batch]:
    """Every image the config asks for, as canonical batches in (class, index) order."""
    size, per_real = cfg.generate.batch_size, cfg.generate.images_per_real
    guides = parents(cfg)  # None: from text only
    batches: list[Batch] = []
    for label, spec in enumerate(cfg.classes):
        styled = [f"{p}, {cfg.style}" if cfg.style else p for p in spec.expanded_prompts()]
        if cfg.pixel_model:  # drawn by class label: the record names the class
            styled = [spec.name]
        mine = guides[spec.name] if guides else []
        count = len(mine) * per_real if mine and per_real else cfg.images_for(spec)
        for start in range(0, count, size):
            n = min(size, count - start)
            jobs = tuple(
                ImageJob(
                    id=label * ID_STRIDE + index,
                    name=f"{spec.name}-{index:06d}",
                    class_name=spec.name,
                    label=label,
                    index=index,
                    prompt=_drawn_prompt(cfg, styled[index % len(styled)], spec.name, index),
                    negative_prompt=cfg.negative_prompt,
                    batch_images=n,
                    guidance_scale=_drawn_guidance(cfg, spec.name, index),
                    parent=mine[index % len(mine)] if mine else None,
                )
                for index in range(start, start + n)
            )
            batches.append(Batch(jobs))
    return batches


def _draw(global_seed: int, class_name: str, index: int, what: str) -> float:
    """A number in [0, 1) fixed by the image's identity and what it is drawn for (never by
    its attempt: a regenerated image keeps its prompt and guidance)."""
    key = f"{global_seed}\0{class_name}\0{index}\0{what}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def _drawn_prompt(cfg: PipelineConfig, template: str, class_name: str, index: int) -> str:
    """The prompt with each pool placeholder filled by this image's draw from that pool."""
    picks = {}
    for pool in placeholders(template):
        values = cfg.pools[pool]
        picks[pool] = values[int(_draw(cfg.seed, class_name, index, f"pool:{pool}") * len(values))]
    return fill(template, picks)


def _drawn_guidance(cfg: PipelineConfig, class_name: str, index: int) -> float:
    """The guidance scale, or this image's draw from the range (4 decimals: readable records)."""
    scale = cfg.generate.guidance_scale
    if not isinstance(scale, list):
        return scale
    low, high = scale
    return round(low + (high - low) * _draw(cfg.seed, class_name, index, "guidance"), 4)


def plan_key(cfg: PipelineConfig, *, fitted_files: bool = True) -> str:
    """A hash of every setting the images depend on (the model's revision aside: records
    carry it). generate's stage.json keeps it, so later stages see a stale manifest. With
    [finetune], the fit's key and (`fitted_files`) its files' hash: a refit is new images."""
    later = {"init_source", "strength", "images_per_real", "lora", "textual_inversion"}
    settings = cfg.model_dump(
        mode="json",
        include={"seed", "images_per_class", "style", "negative_prompt", "classes", "generate"},
        exclude={"classes": {"__all__": {"prompts_file"}}, "generate": later | {"devices"}},
    )  # (settings added later join the key only when used: older keys stay as they were;
    # `devices` changes where images are made, never their bytes)
    gen = cfg.generate
    settings["generate"]["model"] = identity(gen.model)  # (a local one: its revision, in records)
    if gen.init_source or gen.lora or gen.textual_inversion:
        settings["adapters_and_guides"] = gen.model_dump(mode="json", include=later) | {
            "lora": [identity(n) for n in gen.lora],
            "textual_inversion": [identity(n) for n in gen.textual_inversion],
        }
    if gen.lora or gen.textual_inversion:  # their bytes: a changed adapter is new images
        from synthflux.diffusion import adapters  # (diffusion reads this module)

        settings["adapter_digests"] = adapters(cfg, offline=True)
    if gen.init_source:  # the real images' manifest: their records hold their sha256
        settings["init_manifest"] = sha256_file(cfg.layout.source(gen.init_source).manifest)
    if cfg.finetune is not None:
        settings["finetune"] = {"key": fitted.key(cfg)}
        if fitted_files:
            settings["finetune"]["revision"] = fitted.revision(cfg)
    if cfg.pools or any(c.prompts_file for c in cfg.classes):
        settings["pools"] = cfg.pools
        settings["prompts"] = [c.all_prompts for c in cfg.classes]  # a prompt file's lines
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_images(cfg: PipelineConfig) -> list[ImageJob]:
    return [job for batch in plan_batches(cfg) for job in batch.jobs]


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
        "guidance_scale": job.guidance_scale,
        "width": gen.width,
        "height": gen.height,
        "batch_size": gen.batch_size,
        "batch_images": job.batch_images,
        "file": job.file,
        **({"adapters": list(model.adapters)} if model.adapters else {}),
        **({"parent": job.parent.record(), "strength": gen.strength} if job.parent else {}),
        **({"dtype": gen.dtype} if gen.dtype != "auto" else {}),  # (auto: as records were)
    }


# What a record holds only when its setting is used: a record with one its plan lacks was
# made with that setting (real-guided, adapters, a dtype) and is not the image asked for.
WHEN_USED = ("adapters", "parent", "strength", "dtype")


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
    if any(k in record and k not in base for k in WHEN_USED):
        return False
    attempt = record.get("attempt", -1)
    return isinstance(attempt, int) and record.get("seed") == image_seed(
        global_seed, base["class"], base["index"], attempt
    )


def pixels_sha256(pixels: np.ndarray) -> str:
    """The hash a record keeps of its image's decoded (H, W, 3) uint8 pixels."""
    return sha256_bytes(f"{pixels.shape}".encode() + np.ascontiguousarray(pixels).tobytes())


def embedded_record(data: bytes) -> tuple[dict[str, Any], str] | None:
    """(the record inside a PNG we wrote, the hash of its decoded pixels), or None if the
    bytes are not a whole PNG carrying a record."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = getattr(im, "text", {}).get(PNG_KEY)  # PNG text chunks
            pixels = np.asarray(im.convert("RGB"))  # decodes every row: a torn file fails here
        return (json.loads(text), pixels_sha256(pixels)) if text else None
    except Exception:
        return None


def verified_record(
    job: ImageJob,
    rec: ManifestRecord | None,
    cfg: PipelineConfig,
    model: ModelRef,
    layout: DataLayout,
) -> ManifestRecord | None:
    """The job's record if its image is already made and intact (each PNG is read once).

    What vouches for an image: the sha256 in our own part file, for the file's bytes; or, for
    a PNG written before a crash but not yet listed, the record inside it, whose
    `pixels_sha256` must be the hash of the pixels it carries (replaced pixels fail this).
    """
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
    found = embedded_record(data)
    if found is None:
        return None
    emb, pixels = found
    if record_matches(emb, base, cfg.seed) and emb.get("pixels_sha256") == pixels:
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
    if not layout.root.is_dir():
        raise DataError(f"data root {layout.root} does not exist: run `synthflux generate` first")
    return iter_records(layout.manifest, "run `synthflux generate` first")


def iter_records(path: Path, missing: str) -> Iterator[ManifestRecord]:
    """Any source's manifest, streamed; `missing` says what to do when there is none."""
    if not path.is_file():
        raise DataError(f"{path} not found: {missing}")
    return _records(path)


def _records(path: Path) -> Iterator[ManifestRecord]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _parse(path, lineno, line)


def _parse(path: Path, lineno: int, line: str | bytes) -> ManifestRecord:
    try:
        rec = json.loads(line)
        _ = rec["id"], rec["file"], rec["label"], rec["class"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}:{lineno}: malformed record ({e})") from None
    return cast(ManifestRecord, rec)


def mixed_records(path: Path, missing: str, salt: str) -> Iterator[ManifestRecord]:
    """A manifest's records in a mixed order: by a hash of (salt, id), not class by class.

    A manifest lists each class's images together; shards cut from it in that order would
    each hold one class, and training, which keeps one shard in memory at a time, would see
    batches of one class. Only the (hash, offset) of every line is held; records are read
    back one at a time.
    """
    if not path.is_file():
        raise DataError(f"{path} not found: {missing}")
    keys = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(iter(f.readline, b""), 1):
            if line.strip():
                image_id = _parse(path, lineno, line)["id"]
                digest = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()[:8]
                keys.append((digest, f.tell() - len(line), lineno))
    keys.sort()
    with open(path, "rb") as f:
        for _, offset, lineno in keys:
            f.seek(offset)
            yield _parse(path, lineno, f.readline())


def read_manifest(layout: DataLayout) -> list[ManifestRecord]:
    return list(iter_manifest(layout))


def count_records(path: Path) -> int:
    """Manifest lines, counted without parsing them (the full parse streams later)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def relabelled(
    rec: ManifestRecord, labels: dict[str, int], manifest: Path, hint: str
) -> ManifestRecord:
    """The record with the label its class has in the config now (a manifest keeps the
    numbers of the config it was made with: reordered classes must not relabel images)."""
    label = labels.get(rec["class"])
    if label is None:
        raise DataError(
            f"{manifest}: image id {rec['id']} is of class {rec['class']!r}, which is not one "
            f"of the config's classes ({', '.join(labels)}): {hint}"
        )
    return {**rec, "label": label}
