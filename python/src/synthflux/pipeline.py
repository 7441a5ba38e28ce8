"""`synthflux run`: every stage in order, skipping work that is done and verified.

`STAGES` is the one ordered registry of stages (synthflux.stages has the interface); `run`,
`status` and `submit` all loop over it. Stages that resume by themselves always run (they
verify what exists and make only what is missing); the others run only when their result is
not current. `run` stops at the first incomplete stage, and `--from STAGE` first removes that
stage's outputs and everything downstream, once it knows the CNN's backend can run.

A new stage is one module declaring `STAGE = Stage(...)` and one entry here.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthflux import (
    classify,
    devices,
    evaluate,
    finetune,
    generate,
    lineage,
    preprocess,
    report,
    train,
)
from synthflux import filter as filtering  # (the module's name is the stage's)
from synthflux.backends import backend_for, choose
from synthflux.backends.serve import session
from synthflux.config import PipelineConfig
from synthflux.errors import DataError
from synthflux.stages import Skipped, Stage, Summary

log = logging.getLogger("synthflux")

STAGES: tuple[Stage, ...] = (
    finetune.STAGE,
    generate.STAGE,
    filtering.STAGE,
    preprocess.STAGE,
    train.STAGE,
    classify.STAGE,
    evaluate.STAGE,
    report.STAGE,
)


def stage(name: str) -> Stage:
    for st in STAGES:
        if st.name == name:
            return st
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(st.name for st in STAGES)}")


def later_stages(name: str) -> list[Stage]:
    """`name` and every stage after it."""
    names = [st.name for st in STAGES]
    return list(STAGES[names.index(name) :])


def reset_from(cfg: PipelineConfig, stage_name: str) -> list[Path]:
    """Delete the outputs of `stage_name` and every later stage (the trained model stays:
    without its stage.json it is not current, and train makes it again). First, if any of
    them runs the CNN, check that the backend can run: a missing image must not cost the
    results."""
    redo = [st for st in later_stages(stage_name) if st.applies(cfg)]
    if any(st.runs_cnn for st in redo):
        backend_for(cfg).ready()
    removed = []
    for st in redo:
        folder = st.folder(cfg.layout)
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
    _check_devices(cfg)
    cfg = choose(cfg)  # "auto" resolved once: every stage's key names the same backend
    if from_stage is not None:
        for folder in reset_from(cfg, from_stage):
            say(f"run: removed {folder} (--from {from_stage})")
    summaries: list[Summary] = []
    with session():  # one julia (or one container) for every CNN job of the run
        for st in STAGES:
            if st.applies(cfg):
                summaries.append(_run_stage(cfg, st, options or {}, say))
    return summaries


def _check_devices(cfg: PipelineConfig) -> None:
    """`[generate] devices` that are not here: one line before anything runs."""
    if cfg.generate.devices is not None and any(st.spreads and st.applies(cfg) for st in STAGES):
        devices.resolve(cfg.generate.devices)


def _run_stage(
    cfg: PipelineConfig, st: Stage, options: dict[str, dict[str, Any]], say: Callable[[str], None]
) -> Summary:
    """One stage, or its skip if its result is current; a DataError if it did not complete."""
    if not st.resumes and lineage.is_current(cfg, st.name):
        summary: Summary = Skipped(
            st.name,
            f"{st.product} are complete and verified; skipped (use --from {st.name} to redo)",
        )
    else:
        summary = st.run(cfg, **options.get(st.name, {}))
    for line in summary.lines():
        say(f"{st.name}: {line}")
    if not summary.complete:
        later = [s.name for s in later_stages(st.name)[1:]]
        raise DataError(
            f"{st.name} did not complete; re-run to resume before {', '.join(later) or 'the end'}"
        )
    return summary
