"""`synthflux run`: generate -> preprocess -> classify, skipping work that is done and verified.

Each stage already resumes by itself (it verifies what exists and makes only what is missing),
so `run` only chains them, stops at the first incomplete stage, and for `--from STAGE` removes
that stage's outputs and everything downstream first.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from synthflux.config import STAGES, PipelineConfig
from synthflux.errors import DataError

log = logging.getLogger("synthflux")

OUTPUT_DIRS = {"generate": "generated", "preprocess": "preprocessed", "classify": "predictions"}


def reset_from(cfg: PipelineConfig, stage: str) -> list[Path]:
    """Delete the outputs of `stage` and every later stage (the tiny model and weights stay)."""
    removed = []
    for later in STAGES[STAGES.index(stage) :]:
        folder = cfg.data_root / OUTPUT_DIRS[later]
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def run_pipeline(
    cfg: PipelineConfig,
    *,
    from_stage: str | None = None,
    backend: str | None = None,
    image: str | None = None,
    say: Callable[[str], None] = print,
) -> None:
    from synthflux.classify import classify, is_current
    from synthflux.generate import generate
    from synthflux.preprocess import preprocess

    if from_stage is not None:
        for folder in reset_from(cfg, from_stage):
            say(f"run: removed {folder} (--from {from_stage})")

    gen = generate(cfg)
    for line in gen.lines():
        say(f"generate: {line}")
    if not gen.manifest_complete:
        raise DataError("generate did not complete; re-run to resume before preprocessing")

    pre = preprocess(cfg)
    for line in pre.lines():
        say(f"preprocess: {line}")
    if not pre.complete:
        raise DataError("preprocess did not complete; re-run to resume before classifying")

    if is_current(cfg):
        say(
            "classify: predictions are complete and verified; skipped (use --from classify to redo)"
        )
        return
    for line in classify(cfg, backend=backend, image=image).lines():
        say(f"classify: {line}")
