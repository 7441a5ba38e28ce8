"""filter: which generated images reach training ([filter] in the config).

Every generated image is scored, in a fixed order, and dropped for the first reason that
applies: near-duplicate (a perceptual hash close to an image of its class kept before it),
low CLIP score or confidence (against its own prompt; zero-shot among the classes), low real
confidence (a CNN trained on the real training images, by [train]'s settings with
the PyTorch twin, gives its class a probability below the bar), or not among its class's
`keep_top` best. Outputs (DataLayout): filtered/scores.jsonl (every image: its scores and why
it was dropped), filtered/manifest.jsonl (the kept images' records: the synthetic source's
manifest from then on; the PNGs stay in generated/), filtered/real-cnn/ (that CNN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import lineage
from synthflux.config import FilterConfig, PipelineConfig
from synthflux.config_paths import identity
from synthflux.diffusion import digest_of
from synthflux.errors import ConfigError, DataError, Rejected
from synthflux.images import load_image
from synthflux.layout import DataLayout, shard_file
from synthflux.progress import Progress, plural
from synthflux.records import ManifestRecord, iter_records, read_manifest, relabelled
from synthflux.sources import Source, imported
from synthflux.stages import Stage
from synthflux.storage import sha256_file, write_bytes_atomic, write_jsonl_atomic
from synthflux.trainplan import TrainSettings

log = logging.getLogger("synthflux")

DUPLICATE, UNREADABLE, LOW_CONFIDENCE, NOT_TOP = (
    "near-duplicate", "unreadable", "low real confidence", "not in the top k")  # fmt: skip
LOW_CLIP_SCORE, LOW_CLIP_CONFIDENCE = "low CLIP score", "low CLIP confidence"


@dataclass
class Scored:
    """One generated image on its way through the filter."""

    record: ManifestRecord
    scores: dict[str, Any] = field(default_factory=dict)
    dropped: str | None = None  # the reason, in words

    def drop(self, reason: str, detail: str) -> None:
        if self.dropped is None:
            self.dropped = f"{reason}: {detail}"


@dataclass
class FilterSummary:
    kept: dict[str, int]  # per class
    dropped: dict[str, int]  # per reason
    seconds: float = 0.0
    complete: bool = True

    def lines(self) -> list[str]:
        kept = sum(self.kept.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        return [f"kept {plural(kept, 'image')} (per class {self.kept}); dropped: {why}",
                "wrote filtered/manifest.jsonl and filtered/scores.jsonl"]  # fmt: skip


def run(cfg: PipelineConfig) -> FilterSummary:
    """Score every generated image, drop by [filter]'s rules, publish the kept ones."""
    started = time.monotonic()
    if cfg.filter is None:
        raise ConfigError("the config has no [filter] section: nothing to filter by")
    settings, layout = cfg.filter, cfg.layout
    lineage.require(cfg, "generate")
    clip = clip_path(cfg) if settings.clip_model else None  # ("tiny" is built first: keyed)
    stage_key = key(cfg)  # before the work: inputs changed meanwhile are not called current
    items = [Scored(rec) for rec in sorted(read_manifest(layout), key=_order)]
    _check_bytes(layout, items)
    if settings.max_hash_distance >= 0:
        _drop_duplicates(items, layout, settings.max_hash_distance)
    if clip is not None:
        _score_clip(cfg, items, clip)
    if _scores_real(cfg):
        _score_real(cfg, items)
    if settings.keep_top:
        _keep_top(items, cfg.class_names, settings.keep_top)
    kept = [i.record | {"filter": i.scores} for i in items if i.dropped is None]
    write_jsonl_atomic(layout.filter_scores, [_row(i) for i in items])
    _check_kept(cfg, items)  # (before the manifest: a result that cannot train is not published)
    write_jsonl_atomic(layout.filtered_manifest, kept)
    summary = FilterSummary(
        kept={name: sum(r["class"] == name for r in kept) for name in cfg.class_names},
        dropped=dict(Counter(i.dropped.split(":")[0] for i in items if i.dropped)),
        seconds=time.monotonic() - started,
    )
    lineage.record(cfg, "filter", key=stage_key, seconds=summary.seconds,
                   outputs=[layout.filtered_manifest, layout.filter_scores],
                   facts={"kept": summary.kept, "dropped": summary.dropped})  # fmt: skip
    return summary


def _order(rec: ManifestRecord) -> tuple[int, int]:
    return rec["label"], rec["index"]


def _row(item: Scored) -> dict[str, Any]:
    rec = item.record
    return {"id": rec["id"], "class": rec["class"], "file": rec["file"],
            "scores": item.scores, "dropped": item.dropped}  # fmt: skip


# --- the rules, in order ---------------------------------------------------------------------


def _check_bytes(layout: DataLayout, items: list[Scored]) -> None:
    """Every image is the one its record names: scores of an altered file would stay current
    after generate repairs it (the manifest, this stage's key, would be unchanged)."""
    with Progress("filter: verify", len(items)) as progress:
        altered = [i.record["file"] for i in progress.counting(items)
                   if _sha256_or_none(layout.image(i.record["file"])) != i.record["sha256"]]  # fmt: skip
    if altered:
        raise DataError(f"{plural(len(altered), 'generated image')} not as generate made them "
                        f"(first: {layout.image(altered[0])}): run `synthflux generate`, which "
                        "makes them again, then filter")  # fmt: skip


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _drop_duplicates(items: list[Scored], layout: DataLayout, max_distance: int) -> None:
    """Drop an image whose perceptual hash is within `max_distance` bits of one of its
    class's images kept before it."""
    import imagehash
    from PIL import Image

    kept: dict[str, list[tuple[np.ndarray, str]]] = {}
    with Progress("filter: hashes", len(items)) as progress:
        for item in items:
            progress.update()
            try:
                with Image.open(layout.image(item.record["file"])) as im:
                    phash = imagehash.phash(im)
            except OSError as e:
                item.drop(UNREADABLE, str(e))
                continue
            bits = phash.hash.flatten()
            item.scores["phash"] = str(phash)
            same_class = kept.setdefault(item.record["class"], [])
            for other_bits, other in same_class:
                distance = int((bits != other_bits).sum())
                if distance <= max_distance:
                    item.drop(DUPLICATE, f"{distance} bits from {other}")
                    break
            else:
                same_class.append((bits, item.record["name"]))


def _score_real(cfg: PipelineConfig, items: list[Scored]) -> None:
    """Each image's probability of its own class under a CNN trained on the real images."""
    from synthflux import reference

    weights = _train_real_cnn(cfg)
    model = reference.build_model(weights)
    bar = cfg.filter.min_real_confidence if cfg.filter else 0.0
    todo = [i for i in items if i.dropped is None]
    with Progress("filter: real CNN", len(todo)) as progress:
        for start in range(0, len(todo), 64):
            batch, pixels = [], []
            for item in todo[start : start + 64]:
                rec = item.record
                try:
                    pixels.append(load_image(cfg.layout.image(rec["file"]), rec["sha256"],
                                             cfg.preprocess))  # fmt: skip
                    batch.append(item)
                except Rejected as e:
                    item.drop(UNREADABLE, str(e))
            progress.update(len(todo[start : start + 64]))
            if not batch:
                continue
            probs = reference.predict(weights, np.stack(pixels).T, model=model)
            labels = {name: k for k, name in enumerate(cfg.class_names)}
            for item, p in zip(batch, probs, strict=True):
                confidence = float(p[labels[item.record["class"]]])
                item.scores["real_confidence"] = round(confidence, 6)
                if confidence < bar:
                    item.drop(LOW_CONFIDENCE, f"{confidence:.3f} < {bar}")


def _score_clip(cfg: PipelineConfig, items: list[Scored], where: str) -> None:
    """CLIPScore against the image's own prompt, and the zero-shot probability of its class."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    settings = cfg.filter or FilterConfig()
    model, processor = CLIPModel.from_pretrained(where).eval(), CLIPProcessor.from_pretrained(where)
    classes = [f"a photo of a {name}" for name in cfg.class_names]
    todo = [i for i in items if i.dropped is None]
    with Progress("filter: CLIP", len(todo)) as progress, torch.inference_mode():
        for start in range(0, len(todo), 32):
            batch = todo[start : start + 32]
            images = []
            for item in batch:
                with Image.open(cfg.layout.image(item.record["file"])) as im:
                    images.append(im.convert("RGB"))
            prompts = [i.record.get("model_prompt") or i.record["prompt"] for i in batch]
            inputs = processor(text=prompts + classes, images=images, return_tensors="pt",
                               padding=True, truncation=True)  # fmt: skip
            out = model(**inputs)  # text_embeds and image_embeds: projected, unit length
            image, text = out.image_embeds, out.text_embeds
            scores = 100 * (image * text[: len(batch)]).sum(-1).clamp(min=0)
            probs = (model.logit_scale.exp() * image @ text[len(batch) :].T).softmax(-1)
            for item, score, p in zip(batch, scores.tolist(), probs, strict=True):
                confidence = float(p[cfg.class_names.index(item.record["class"])])
                item.scores |= {
                    "clip_score": round(score, 4),
                    "clip_confidence": round(confidence, 6),
                }
                if score < settings.min_clip_score:
                    item.drop(LOW_CLIP_SCORE, f"{score:.2f} < {settings.min_clip_score}")
                elif confidence < settings.min_clip_confidence:
                    item.drop(
                        LOW_CLIP_CONFIDENCE, f"{confidence:.3f} < {settings.min_clip_confidence}"
                    )
            progress.update(len(batch))


def clip_path(cfg: PipelineConfig) -> str:
    """Where [filter] clip_model loads from: the tiny test CLIP (built once), a folder, or a
    Hub id (downloaded into the Hugging Face cache first, so that its commit is known)."""
    name = cfg.filter.clip_model if cfg.filter else ""
    if name == "tiny":
        from synthflux.tiny_model import save_tiny_clip

        return str(save_tiny_clip(cfg.layout.tiny_clip))
    digest_of(name, "filter.clip_model", cfg, offline=False)  # a clear error if unavailable
    local = Path(name).expanduser()
    return str(local) if local.is_dir() else name


def _clip_digest(cfg: PipelineConfig) -> str | None:
    """The CLIP model's sha256 or commit, without building or downloading anything."""
    name = cfg.filter.clip_model if cfg.filter else ""
    if name == "tiny":
        if not (cfg.layout.tiny_clip / "config.json").is_file():
            return "tiny (not built yet)"
        name = str(cfg.layout.tiny_clip)
    return digest_of(name, "filter.clip_model", cfg, offline=True)


# The setting behind each reason an image is dropped, for a person who must loosen it.
SETTING = {DUPLICATE: "max_hash_distance", LOW_CONFIDENCE: "min_real_confidence",
           NOT_TOP: "keep_top", LOW_CLIP_SCORE: "min_clip_score",
           LOW_CLIP_CONFIDENCE: "min_clip_confidence"}  # fmt: skip


def _check_kept(cfg: PipelineConfig, items: list[Scored]) -> None:
    """An error when the filter kept no image, or none of a class the CNN learns from the
    synthetic images alone: naming the class and the settings that dropped them."""
    assert cfg.filter is not None
    for name in [None, *cfg.class_names]:
        mine = [i for i in items if name is None or i.record["class"] == name]
        if not mine or any(i.dropped is None for i in mine):
            continue
        if name is not None and "real" in cfg.train.sources:
            log.warning("filter: class %r kept none of its %d images: the CNN learns it from "
                        "the real images alone", name, len(mine))  # fmt: skip
            continue
        reasons = Counter(i.dropped.split(":")[0] for i in mine if i.dropped)
        why = ", ".join(f"{n} {r} (filter.{SETTING.get(r, r)} = "
                        f"{getattr(cfg.filter, SETTING[r]) if r in SETTING else '?'})"
                        for r, n in reasons.items())  # fmt: skip
        what = "any generated image" if name is None else f"any image of class {name!r}"
        raise DataError(f"the filter did not keep {what} ({len(mine)} dropped: {why}): loosen "
                        f"those settings ({cfg.layout.filter_scores} has every score)")  # fmt: skip


def _scores_real(cfg: PipelineConfig) -> bool:
    """min_real_confidence needs the real CNN; keep_top ranks by it when real images were
    imported for training, else by CLIP's or by index."""
    settings = cfg.filter
    assert settings is not None
    return settings.needs_real or (
        settings.keep_top > 0 and any(s.split == "train" for s in imported(cfg.layout))
    )


def _keep_top(items: list[Scored], classes: list[str], top: int) -> None:
    """Per class, keep the `top` best of what is left: by real confidence, else by index."""
    for name in classes:
        left = [i for i in items if i.dropped is None and i.record["class"] == name]
        left.sort(key=lambda i: (-i.scores.get("real_confidence", 0.0),
                                 -i.scores.get("clip_confidence", 0.0), i.record["index"]))  # fmt: skip
        for rank, item in enumerate(left[top:], top + 1):
            item.drop(NOT_TOP, f"rank {rank} of its class, keep_top = {top}")


# --- the CNN trained on the real images ------------------------------------------------------


def _real_sources(cfg: PipelineConfig) -> list[Source]:
    found = [s for s in imported(cfg.layout) if s.split == "train"]
    if not found:
        raise DataError(
            "filter.min_real_confidence scores images with a CNN trained on real images, and "
            "none were imported for training: run `synthflux import CONFIG FOLDER --as train` "
            "(or remove that setting)"
        )
    for source in found:
        lineage.require_imported(source.paths)
    return found


def _real_cnn_key(cfg: PipelineConfig) -> dict[str, Any]:
    """What the real CNN is trained from: the real images, the classes, preprocess and train."""
    return {
        "real": {s.name: sha256_file(s.paths.manifest) for s in _real_sources(cfg)},
        "classes": cfg.class_names,
        "preprocess": cfg.preprocess.model_dump(exclude={"workers"}),
        "train": cfg.train.model_dump(exclude={"timeout_s", "sources", "baseline"}),
    }


def _train_real_cnn(cfg: PipelineConfig) -> dict[str, np.ndarray]:
    """Train [train]'s network with the PyTorch twin on the real training images (one shard),
    or reuse the one trained from the same inputs (a changed keep_top needs no new CNN)."""
    from synthflux.weights import load_weights

    folder = cfg.layout.filter_cnn
    wanted = json.dumps(_real_cnn_key(cfg), sort_keys=True)
    made = folder / "key.json"  # written last: present only beside complete weights
    if made.is_file() and made.read_text() == wanted:
        log.info("filter: the CNN trained on the real images is current; reused")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        _fit_real_cnn(cfg, folder)
        write_bytes_atomic(made, wanted.encode())
    return dict(load_weights(folder / "run" / "weights.npz"))


def _fit_real_cnn(cfg: PipelineConfig, folder: Path) -> None:
    from synthflux.reference_train import train
    from synthflux.shardwriter import ShardWriter
    from synthflux.weights import init_weights, save_weights

    pre = cfg.preprocess
    folder.mkdir(parents=True)
    labels = {name: k for k, name in enumerate(cfg.class_names)}
    ids, classes = [], []
    with ShardWriter(folder / "rows.npy", (pre.channels, pre.height, pre.width)) as writer:
        for source in _real_sources(cfg):
            for rec in iter_records(source.paths.manifest, "import it again"):
                rec = relabelled(rec, labels, source.paths.manifest, "import it again")
                try:
                    writer.append(load_image(source.paths.image(rec["file"]), None, pre))
                except Rejected:
                    continue  # preprocess lists it among the source's rejects
                ids.append(rec["id"])
                classes.append(rec["label"])
        writer.finish(folder / shard_file(0), labels=np.array(classes, np.int64),
                      ids=np.array(ids, np.int64))  # fmt: skip
    t = cfg.train
    save_weights(folder / "init.npz", init_weights(pre.width, pre.height, pre.channels,
                 len(labels), t.seed, t.blocks, t.kernel))  # fmt: skip
    log.info(
        "filter: training a CNN on %s to score the synthetic ones", plural(len(ids), "real image")
    )
    train([("real", folder)], folder / "init.npz", folder / "run", TrainSettings.of(t),
          lambda line: log.debug("filter: %s", line))  # fmt: skip


# --- done-ness -------------------------------------------------------------------------------


def key(cfg: PipelineConfig) -> str:
    """The generated manifest, the filter's settings and the classes; and, when the real
    CNN scores, the real images' manifests and what that CNN is trained with."""
    settings: FilterConfig = cfg.filter or FilterConfig()
    inputs: dict[str, Any] = {
        "manifest": sha256_file(cfg.layout.manifest),
        "filter": settings.model_dump() | {"clip_model": identity(settings.clip_model)},
        "classes": cfg.class_names,
    }
    if settings.clip_model:
        inputs["clip"] = _clip_digest(cfg)
    if _scores_real(cfg):
        inputs["real_cnn"] = _real_cnn_key(cfg)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


STAGE = Stage(
    "filter", run, key=key, folder=lambda layout: layout.filtered,
    results=lambda cfg: [cfg.layout.filtered_manifest], needs=("generate",),
    applies=lambda cfg: cfg.filters, unit="images", product="filtered images",
    help="drop near-duplicate and unconvincing generated images ([filter])",
    description="Score every generated image and keep those that pass [filter]'s rules: "
    "near-duplicates within a class (perceptual hash), CLIP's score and zero-shot confidence, the confidence of a CNN trained on the "
    "real training images, and the best keep_top per class. Writes DATA/filtered/manifest.jsonl "
    "(what preprocess then reads as the synthetic source) and DATA/filtered/scores.jsonl (every "
    "image's scores and why it was dropped).",
)  # fmt: skip
