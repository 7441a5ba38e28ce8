"""The interface every stage module offers, and the states `status` reports.

A stage is a module with `run(cfg, *, shard=..., ...) -> Summary` (do the missing work, keep
what is verified) and `state(cfg, n) -> StageState` (what is done, grouped as n tasks, by the
stage's own definition of done). `pipeline.STAGES` lists them in order; `run`, `status` and
`submit` loop over that list, so a new stage is one module and one entry there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from synthflux.config import PipelineConfig
from synthflux.storage import write_json_atomic


class Summary(Protocol):
    """What a stage's run returns: whether its result is complete, and lines for a person."""

    @property
    def complete(self) -> bool: ...

    def lines(self) -> list[str]: ...


@dataclass
class ShardState:
    index: int
    done: int  # images (generate) or output shards (preprocess, classify) complete
    total: int

    @property
    def complete(self) -> bool:
        return self.done >= self.total


@dataclass
class StageState:
    stage: str
    shards: list[ShardState]
    complete: bool
    note: str = ""
    waiting: bool = False  # the stage before is incomplete, so this one's shards are unknown
    needed: bool = True  # False: the config does not use this stage (it counts as complete)

    def incomplete(self) -> list[int]:
        return [s.index for s in self.shards if not s.complete]


@dataclass(frozen=True)
class Skipped:
    """The summary of a stage that `run` did not start because its result is current."""

    stage: str
    reason: str
    complete: bool = True

    def lines(self) -> list[str]:
        return [self.reason]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., Summary]
    state: Callable[[PipelineConfig, int], StageState]
    sharded: bool  # runs as N tasks (`--shard I/N`) on a cluster, else as one job
    # True: run() itself keeps verified work and says so, so `synthflux run` always calls it;
    # False: `synthflux run` calls it only when state() says the result is not current.
    resumes: bool
    unit: str  # what state() counts: "images", "output shards"
    product: str  # what it makes, for a person: "images", "predictions"
    applies: Callable[[PipelineConfig], bool] = lambda cfg: True  # e.g. generate: not needed
    # for a config that trains on real images only
    uses_gpu: bool = False  # on a cluster, its tasks get --gpus-per-task


# --- stage.json: a stage's done marker and its timings --------------------------------------


def read_stage_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_stage_marker(
    path: Path,
    stage: str,
    *,
    key: str,
    seconds: float,
    complete: bool,
    facts: dict[str, Any],
) -> dict[str, Any]:
    """Write stage.json: what the result was made from (`key`), whether it is complete, and
    two timings: this run's, and the result's (every run's seconds since `key` last changed,
    so a resumed or sharded result still says what it cost)."""
    previous = read_stage_marker(path) or {}
    carried = previous.get("result_seconds", 0.0) if previous.get("key") == key else 0.0
    marker = {
        "stage": stage,
        "key": key,
        "complete": complete,
        "seconds": round(seconds, 3),  # this run
        "result_seconds": round(float(carried) + seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **facts,
    }
    write_json_atomic(path, marker)
    return marker


def is_fresh(marker_path: Path, key: str, outputs_root: Path) -> bool:
    """A stage's result is current: its stage.json has this key, and every file it lists
    (relative to `outputs_root`) still has the sha256 it had when it was published."""
    from synthflux.storage import sha256_file

    marker = read_stage_marker(marker_path)
    if marker is None or marker.get("key") != key:
        return False
    outputs = marker.get("outputs") or {}
    try:
        return bool(outputs) and all(
            sha256_file(outputs_root / name) == digest for name, digest in outputs.items()
        )
    except OSError:
        return False


def one_job(stage: str, complete: bool, note: str, done: int = 1, total: int = 1) -> StageState:
    """The state of a stage that runs as one job (not as tasks)."""
    shards = [ShardState(0, done if complete else 0, total)]
    return StageState(stage, shards, complete, "" if complete else note)
