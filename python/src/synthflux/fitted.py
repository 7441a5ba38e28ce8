"""The fitted generator as every stage sees it: the real images a fit reads, the key of all it
is computed from, the fitted model's revision (the hash of its files); and what both fits
(pixel_diffusion via finetune, lora_fit) share: checkpoints and folders written in whole.

generate's key holds both, so a changed setting, a changed real image or a refit makes the
images, and everything computed from them, stale (records.plan_key).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from synthflux.config import PipelineConfig, PreprocessConfig
from synthflux.errors import DataError, Rejected
from synthflux.images import load_image
from synthflux.layout import SourcePaths
from synthflux.sources import real_training_source, records_by_class
from synthflux.storage import (
    TEMP_TAG,
    hash_folder,
    hold_point,
    sha256_file,
    write_bytes_atomic,
)

log = logging.getLogger("synthflux")


def real_source(cfg: PipelineConfig) -> SourcePaths:
    """The imported training source the fit reads; a clear error if it cannot be used."""
    assert cfg.finetune is not None
    return real_training_source(cfg, "finetune.source", cfg.finetune.source,
                                "a generator fitted to it")  # fmt: skip


def real_records(
    cfg: PipelineConfig, source: SourcePaths | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each class's real images (manifest records, in id order) in `source` (default: the
    fit's); an error naming a class that has none."""
    return records_by_class(cfg, source or real_source(cfg), "finetune.source",
                            "the generator cannot learn it; import a folder with every class")  # fmt: skip


def real_pixels(
    cfg: PipelineConfig, channels: Literal[1, 3], only: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every real training image (of class `only`, if given) at generate's size in [-1, 1]:
    (N, C, H, W) float32, and the labels; read as preprocess reads images (resample, aspect)."""
    pre = cfg.preprocess
    read = PreprocessConfig(width=cfg.generate.width, height=cfg.generate.height,
                            channels=channels, resample=pre.resample, aspect=pre.aspect,
                            pad_value=pre.pad_value, mean=[0.5], std=[0.5])  # fmt: skip
    source = real_source(cfg)
    pixels, labels = [], []
    for label, (name, records) in enumerate(real_records(cfg, source).items()):
        for rec in records if only in (None, name) else []:
            try:
                pixels.append(load_image(source.image(rec["file"]), rec["sha256"], read))
            except Rejected as e:
                raise DataError(f"{source.image(rec['file'])}: {e}: import it again") from None
            labels.append(label)
    return np.stack(pixels), np.array(labels, np.int64)


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(path: Path, key: str, step: int, state: dict[str, Any]) -> None:
    """Everything a resumed fit needs (weights, optimizer, step), written whole or not at all."""
    import torch

    buf = io.BytesIO()
    torch.save({"key": key, "step": step, **state}, buf)
    write_bytes_atomic(path, buf.getvalue())
    hold_point("fit-checkpoint")


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint of this fit, if there is one; a damaged one is said, set aside as
    .damaged, and the fit starts afresh; one of other settings is removed."""
    import torch

    if not path.is_file():
        return None
    try:
        found: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        _ = found["key"], found["step"]
    except Exception as e:  # torch.load raises many types for a torn or foreign file
        log.warning("finetune: %s is damaged (%s: %s); kept as %s.damaged, fitting afresh",
                    path, type(e).__name__, str(e).splitlines()[0] if str(e) else "", path.name)  # fmt: skip
        path.replace(path.with_name(path.name + ".damaged"))
        return None
    if found["key"] != key:
        log.info("finetune: %s belongs to other settings or images; fitting afresh", path)
        path.unlink()
        return None
    return found


def loss_note(smoothed: float | None, loss: float) -> float:
    """An exponential moving average of the loss, for the progress line."""
    return loss if smoothed is None else 0.98 * smoothed + 0.02 * loss


def move_into_place(built: Path, final: Path) -> None:
    """A model folder written under a temp name replaces `final` (never half of one)."""
    if final.exists():
        shutil.rmtree(final)
    built.rename(final)


def temp_folder(final: Path) -> Path:
    """A temp name beside `final`, removed by later runs if this process dies
    (storage.remove_stale_temps)."""
    tmp = final.with_name(f".{final.name}.{TEMP_TAG}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def class_keys(cfg: PipelineConfig, base_revision: str) -> dict[str, str]:
    """Each class's LoRA fit key: its real images, its prompts, the base model and the
    settings (the real source's manifest read once for all of them)."""
    assert cfg.finetune is not None
    records = real_records(cfg)
    shared = {"finetune": cfg.finetune.model_dump(mode="json"), "base": base_revision,
              "style": cfg.style, "pools": cfg.pools,
              "size": [cfg.generate.width, cfg.generate.height]}  # fmt: skip
    keys = {}
    for spec in cfg.classes:
        inputs = {**shared, "prompts": spec.all_prompts, "variables": spec.variables,
                  "images": [(r["id"], r["sha256"]) for r in records[spec.name]]}  # fmt: skip
        keys[spec.name] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return keys


def base_revision(cfg: PipelineConfig, offline: bool = True) -> str:
    """The revision of the model a LoRA is fitted on (generate.model)."""
    from synthflux.diffusion import base_model  # diffusion reads records, which reads this

    ref = base_model(cfg, offline)
    if ref is None:
        raise DataError(f"generate.model {cfg.generate.model!r} is not available here")
    return ref.revision


def key(cfg: PipelineConfig) -> str:
    """What the fitted model is computed from: the settings, the classes, the real images
    (their manifest holds every file's sha256), and the size (pixel) or base model (lora)."""
    fit = cfg.finetune
    assert fit is not None
    inputs: dict[str, Any] = {
        "finetune": fit.model_dump(mode="json"),
        "classes": cfg.class_names,
        "real": sha256_file(real_source(cfg).manifest),
    }
    if fit.method == "pixel":  # the real images are read at generate's size, as preprocess reads
        pre = cfg.preprocess
        inputs["read"] = [cfg.generate.width, cfg.generate.height, pre.resample, pre.aspect]
    else:
        base = base_revision(cfg)
        inputs["classes"] = class_keys(cfg, base)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def revision(cfg: PipelineConfig) -> str | None:
    """The fitted model's files' hash (cached by size and mtime), None before the fit."""
    folder = cfg.layout.fitted_model
    return hash_folder(folder, cfg.layout.revisions) if folder.is_dir() else None
