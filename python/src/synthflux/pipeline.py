"""`synthflux run`: every stage in order, skipping work that is done and verified.

`STAGES` is the one ordered registry of stages (synthflux.stages has the interface); `run`,
`status` and `submit` all loop over it. Stages that resume by themselves always run (they
verify what exists and make only what is missing); the others run only when their result is
not current. `run` stops at the first incomplete stage, and `--from STAGE` first removes that
stage's outputs and everything downstream.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthflux import classify, evaluate, generate, preprocess, report, train
from synthflux.config import PipelineConfig
from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.stages import Skipped, Stage, Summary

log = logging.getLogger("synthflux")

STAGES: tuple[Stage, ...] = (
    generate.STAGE,
    preprocess.STAGE,
    train.STAGE,
    classify.STAGE,
    evaluate.STAGE,
    report.STAGE,
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    return STAGES[STAGE_NAMES.index(name)]


def reset_from(cfg: PipelineConfig, stage_name: str) -> list[Path]:
    """Delete the outputs of `stage_name` and every later stage (the models and weights stay)."""
    layout = DataLayout(cfg.data_root)
    removed = []
    for later in STAGE_NAMES[STAGE_NAMES.index(stage_name) :]:
        folder = layout.stage_folder(later)
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def run_pipeline(
    cfg: PipelineConfig,
    *,
    from_stage: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    say: Callable[[str], None] = print,
) -> list[Summary]:
    """Run the stages in order; `options` are keyword arguments per stage name (e.g.
    {"classify": {"backend": "reference"}}). Returns each stage's summary. A stage the config
    does not need (generate, for real images only) is left out."""
    if from_stage is not None:
        for folder in reset_from(cfg, from_stage):
            say(f"run: removed {folder} (--from {from_stage})")
    summaries: list[Summary] = []
    for st in STAGES:
        if not st.applies(cfg):
            continue
        if not st.resumes and st.state(cfg, 1).complete:
            summary: Summary = Skipped(
                st.name,
                f"{st.product} are complete and verified; skipped (use --from {st.name} to redo)",
            )
        else:
            summary = st.run(cfg, **(options or {}).get(st.name, {}))
        summaries.append(summary)
        for line in summary.lines():
            say(f"{st.name}: {line}")
        if not summary.complete:
            later = STAGE_NAMES[STAGE_NAMES.index(st.name) + 1 :]
            raise DataError(
                f"{st.name} did not complete; re-run to resume before {', '.join(later) or 'the end'}"
            )
    return summaries
