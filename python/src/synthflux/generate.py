"""Stage 1, generate: class prompts -> PNG images + manifest.jsonl, with Stable Diffusion.

Every image is fixed by (global seed, class, index within class, attempt): it has its own
seed and its own CPU generator, and batches are always padded to `batch_size`, so an image's
bytes do not depend on shard count, resume or order. Each PNG carries its own record in a
text chunk, so a run killed at any moment is resumed from the files alone.

Layout under DATA/generated/:
    <class>/<class>-000042.png   the images (written atomically)
    parts/part-00000-of-00001.jsonl   the records one `--shard I/N` run made (its done marker)
    manifest.jsonl               every record of every part, sorted by id (status "ok")
    dropped.jsonl                images the safety checker flagged on every attempt
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from synthflux.config import PipelineConfig
from synthflux.errors import DataError, ModelError
from synthflux.progress import Progress, quiet_library_progress
from synthflux.storage import (
    ShardSpec,
    file_lock,
    read_jsonl,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)

log = logging.getLogger("synthflux")

PNG_KEY = "synthflux"  # the PNG text chunk holding an image's record
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


# --- planning: which images exist, and what each one is ---------------------------------


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


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Where to load the model from, and what to record about it in the manifest."""

    path: str
    name: str
    revision: str
    scheduler: str


def _hash_folder(folder: Path, cache: Path) -> str:
    """A local model's revision: the sha256 of its files' hashes.

    Hashing a multi-GB model costs seconds, so the result is cached (in `cache`, under the
    data root, never in the model folder) keyed by every file's size and mtime.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256(
        "\n".join(
            f"{f.relative_to(folder).as_posix()} {f.stat().st_size} {f.stat().st_mtime_ns}"
            for f in files
        ).encode()
    ).hexdigest()
    try:
        cached = json.loads(cache.read_text()).get(str(folder.resolve()), {})
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key:
        return str(cached["revision"])
    log.info("generate: hashing the model files in %s (cached for later runs)", folder)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(f).encode())
    revision = "sha256:" + h.hexdigest()
    # A cache that cannot be written costs time only.
    with contextlib.suppress(OSError, ValueError), file_lock(cache.with_suffix(".lock")):
        entries = json.loads(cache.read_text()) if cache.is_file() else {}
        entries[str(folder.resolve())] = {"key": key, "revision": revision}
        write_json_atomic(cache, entries)
    return revision


def _model_scheduler(folder: Path, wanted: str) -> str:
    if wanted != "default":
        return SCHEDULERS[wanted]
    try:
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return str(cfg["_class_name"])
    except (OSError, KeyError, ValueError):
        return "default"


def resolve_model(cfg: PipelineConfig) -> ModelRef:
    """Find the model (building the tiny one, or using the Hugging Face cache) without loading it."""
    gen = cfg.generate
    cache = cfg.data_root / "models" / "revisions.json"
    if gen.model == "tiny":
        from synthflux.tiny_model import save_tiny_model

        folder = save_tiny_model(cfg.data_root / "models" / "tiny")
        return ModelRef(
            str(folder),
            "tiny",
            _hash_folder(folder, cache),
            _model_scheduler(folder, gen.scheduler),
        )
    local = Path(gen.model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelError(
                f"generate.model = {gen.model!r} is a folder without model_index.json; "
                "point it at a diffusers pipeline saved with save_pretrained"
            )
        return ModelRef(
            str(local),
            gen.model,
            _hash_folder(local, cache),
            _model_scheduler(local, gen.scheduler),
        )
    if gen.model.startswith((".", "/", "~")) or gen.model.count("/") > 1:
        raise ModelError(f"generate.model = {gen.model!r}: no such folder")
    folder = Path(_download(gen.model, gen.revision))
    # A Hub snapshot folder is named after its commit: the exact revision we used.
    revision = folder.name if folder.parent.name == "snapshots" else _hash_folder(folder, cache)
    return ModelRef(str(folder), gen.model, revision, _model_scheduler(folder, gen.scheduler))


def _download(model_id: str, revision: str | None) -> str:
    """Resolve a Hub id to a local snapshot (downloading it unless HF_HUB_OFFLINE is set)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its warnings repeat what our one-line error says
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return str(DiffusionPipeline.download(model_id, revision=revision))
    except Exception as e:  # huggingface_hub raises many types; all mean "cannot get it"
        hint = (
            "it is not in the local cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to "
            "allow downloads, or set generate.model to a local folder"
            if offline
            else "check the id, run `huggingface-cli login` if the model is gated, or set "
            "generate.model to a local folder (or HF_HOME to a cache that has it)"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot get model {model_id!r}: {hint} ({type(e).__name__}: {reason})"
        ) from None


def pick_device(cfg: PipelineConfig) -> tuple[str, Any]:
    import torch

    gen = cfg.generate
    device = gen.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "generate.device = 'cuda' but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'"
        )
    dtype = gen.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(cfg: PipelineConfig, model: ModelRef) -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    from diffusers import AutoPipelineForText2Image

    device, dtype = pick_device(cfg)
    gen = cfg.generate
    quiet_library_progress()
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older lack `dtype`
            warnings.simplefilter("ignore", FutureWarning)
            pipe = AutoPipelineForText2Image.from_pretrained(model.path, torch_dtype=dtype)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {model.name!r} from {model.path}: {first}") from None
    if gen.scheduler != "default":
        scheduler_cls = getattr(diffusers, SCHEDULERS[gen.scheduler])
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if gen.attention_slicing:
        pipe.enable_attention_slicing()
    if gen.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if gen.compile:
        import torch

        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- records: what the manifest says about each image --------------------------------------


def base_record(job: ImageJob, cfg: PipelineConfig, model: ModelRef) -> dict[str, Any]:
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


def _matches(record: dict[str, Any], base: dict[str, Any], global_seed: int) -> bool:
    if any(record.get(k) != v for k, v in base.items()):
        return False
    attempt = record.get("attempt", -1)
    return isinstance(attempt, int) and record.get("seed") == image_seed(
        global_seed, base["class"], base["index"], attempt
    )


def _embedded_record(data: bytes) -> dict[str, Any] | None:
    """The record inside a PNG we wrote, or None if the bytes are not a whole PNG of ours."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = im.text.get(PNG_KEY)  # type: ignore[attr-defined]
            im.load()  # decodes every row: a truncated file fails here
        return json.loads(text) if text else None
    except Exception:
        return None


# --- the run --------------------------------------------------------------------------------


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


def generated_dir(cfg: PipelineConfig) -> Path:
    return cfg.data_root / "generated"


def _known_records(out: Path) -> dict[int, dict[str, Any]]:
    known: dict[int, dict[str, Any]] = {}
    for part in sorted((out / "parts").glob("part-*.jsonl")):
        for rec in read_jsonl(part):
            known[rec["id"]] = rec
    return known


def _to_png(pixels: np.ndarray, record: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _write_image(out: Path, pixels: np.ndarray, record: dict[str, Any]) -> dict[str, Any]:
    """Runs on the writer thread: encode, hash and write one PNG; return its full record."""
    data = _to_png(pixels, record)
    # No fsync per image: a resume hashes or fully decodes every PNG, so a file torn by a
    # power cut is made again; fsync would only slow the writer on network file systems.
    write_bytes_atomic(out / record["file"], data, durable=False)
    return {**record, "status": "ok", "sha256": sha256_bytes(data)}


def _scan(
    jobs: list[ImageJob], cfg: PipelineConfig, model: ModelRef, out: Path
) -> tuple[dict[int, dict[str, Any]], list[ImageJob]]:
    """Split this shard's jobs into those already done (verified) and those still to make."""
    known = _known_records(out)
    done: dict[int, dict[str, Any]] = {}
    todo: list[ImageJob] = []
    with Progress("verify existing", len(jobs)) as progress:  # a resume hashes every file
        for job in jobs:
            rec = _verified(job, known.get(job.id), cfg, model, out)
            if rec is None:
                todo.append(job)
            else:
                done[job.id] = rec
            progress.update()
    return done, todo


def _verified(
    job: ImageJob, rec: dict[str, Any] | None, cfg: PipelineConfig, model: ModelRef, out: Path
) -> dict[str, Any] | None:
    """The job's record if its image is already made and intact (each PNG is read once)."""
    base = base_record(job, cfg, model)
    if rec is not None and rec.get("status") == "dropped" and _matches(rec, base, cfg.seed):
        return rec
    try:
        data = (out / job.file).read_bytes()
    except OSError:
        return None
    if (
        rec is not None
        and _matches(rec, base, cfg.seed)
        and sha256_bytes(data) == rec.get("sha256")
    ):
        return rec
    # Written before a crash, not yet in a part file: trust only a whole PNG carrying our record.
    emb = _embedded_record(data)
    if emb is not None and _matches(emb, base, cfg.seed):
        return {**emb, "status": "ok", "sha256": sha256_bytes(data)}
    return None


def merge_manifest(cfg: PipelineConfig, model: ModelRef) -> tuple[int, bool, dict[str, int]]:
    """Rebuild manifest.jsonl and dropped.jsonl from every part that fits the current config."""
    out = generated_dir(cfg)
    jobs = plan_images(cfg)
    with file_lock(out / ".manifest.lock"):
        known = _known_records(out)
        ok, dropped = [], []
        for job in jobs:
            rec = known.get(job.id)
            if rec is None or not _matches(rec, base_record(job, cfg, model), cfg.seed):
                continue
            (dropped if rec.get("status") == "dropped" else ok).append(rec)
        write_jsonl_atomic(out / "manifest.jsonl", ok)
        write_jsonl_atomic(out / "dropped.jsonl", dropped)
    per_class: dict[str, int] = {name: 0 for name in cfg.class_names}
    for rec in ok:
        per_class[rec["class"]] += 1
    return len(ok), len(ok) + len(dropped) == len(jobs), per_class


@dataclass
class _Pending:
    job: ImageJob
    attempt: int = 0
    flagged_seeds: list[int] = field(default_factory=list)


def generate(
    cfg: PipelineConfig, shard: ShardSpec | None = None, limit: int | None = None
) -> GenerateSummary:
    """Make this shard's missing images, then refresh the manifest. Safe to re-run."""
    shard = shard or ShardSpec()
    out = generated_dir(cfg)
    jobs = [j for j in plan_images(cfg) if shard.owns(j.id)]
    summary = GenerateSummary(shard=str(shard), planned=len(jobs))
    model = resolve_model(cfg)
    if out.is_dir():
        remove_stale_temps(out)  # left by a killed run
    done, todo = _scan(jobs, cfg, model, out)
    summary.reused = len(done)
    if limit is not None:
        summary.remaining = max(len(todo) - limit, 0)
        todo = todo[:limit]
    start = time.monotonic()
    try:
        if todo:
            log.info(
                "generate: %d images to make with %s (%s)", len(todo), model.name, model.scheduler
            )
            _run(load_pipeline(cfg, model), cfg, model, out, todo, done, summary)
    finally:  # keep what was made, even on Ctrl-C, so a re-run and `status` see it at once
        write_jsonl_atomic(
            out / "parts" / f"part-{shard.tag}.jsonl", [done[k] for k in sorted(done)]
        )
    summary.seconds = time.monotonic() - start
    summary.images_per_s = summary.generated / summary.seconds if summary.seconds else 0.0
    summary.manifest_images, summary.manifest_complete, summary.per_class = merge_manifest(
        cfg, model
    )
    write_json_atomic(
        out / "stage.json",
        {
            "stage": "generate",
            "shard": str(shard),
            "seconds": round(summary.seconds, 3),
            "images": summary.generated,
            "complete": summary.manifest_complete,
        },
    )
    return summary


def _run(
    pipe: Any,
    cfg: PipelineConfig,
    model: ModelRef,
    out: Path,
    todo: list[ImageJob],
    done: dict[int, dict[str, Any]],
    summary: GenerateSummary,
) -> None:
    """The batch loop: the GPU denoises batch k+1 while the writer thread saves batch k."""
    import torch

    gen = cfg.generate
    queue: deque[_Pending] = deque(_Pending(j) for j in todo)
    in_flight: deque[Future[dict[str, Any]]] = deque()

    def collect(max_in_flight: int) -> None:
        while len(in_flight) > max_in_flight:
            rec = in_flight.popleft().result()
            done[rec["id"]] = rec

    writer_pool = ThreadPoolExecutor(1, initializer=_lower_priority)
    with Progress("generate", len(todo)) as progress, writer_pool as writer:
        while queue:
            batch = [queue.popleft() for _ in range(min(gen.batch_size, len(queue)))]
            seeds = [image_seed(cfg.seed, p.job.class_name, p.job.index, p.attempt) for p in batch]
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
            pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            for item, seed, img, flagged in zip(batch, seeds, pixels, flags, strict=False):
                record = {
                    **base_record(item.job, cfg, model),
                    "seed": seed,
                    "attempt": item.attempt,
                    "flagged_seeds": item.flagged_seeds,
                }
                if flagged:
                    _handle_flagged(cfg, item, seed, record, queue, done, summary, progress)
                    continue
                in_flight.append(writer.submit(_write_image, out, img, record))
                summary.generated += 1
                progress.update()
            collect(max_in_flight=2 * gen.batch_size)
        collect(max_in_flight=0)


def _lower_priority() -> None:
    """The writer thread yields the CPU to denoising (on a CPU-only run they share cores)."""
    with contextlib.suppress(AttributeError, OSError):  # per-thread nice is Linux-only
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _handle_flagged(
    cfg: PipelineConfig,
    item: _Pending,
    seed: int,
    record: dict[str, Any],
    queue: deque[_Pending],
    done: dict[int, dict[str, Any]],
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


def read_manifest(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The generation manifest, for the later stages; a clear error if generate never ran."""
    path = generated_dir(cfg) / "manifest.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: run `synthflux generate` first")
    return read_jsonl(path)
