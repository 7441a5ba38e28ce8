"""The stage contract: what every stage declares, so that the rest of the program can derive
everything it needs from the one registry, `pipeline.STAGES`.

A stage is one module with a `run(cfg, **options) -> Summary` function (do the missing work,
keep what is verified) and a `STAGE = Stage(...)` declaration: the stages it needs, the key of
everything its result is computed from, where it writes, what later stages read, whether it
is sharded, runs the CNN or wants a GPU, and its command-line options. `synthflux.lineage`
answers "is it current?" from its stage.json; the CLI, `run`, `status` and `submit` loop over
`STAGES`. A stage never imports another stage's module.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from synthflux.config import PipelineConfig
from synthflux.errors import ConfigError
from synthflux.layout import DataLayout
from synthflux.storage import ShardSpec, write_json_atomic


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


# --- command-line options: a stage declares them, the CLI adds them -------------------------


def shard_spec(text: str) -> ShardSpec:
    """An argparse type: "I/N"."""
    try:
        return ShardSpec.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard ")) from None


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= least."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


@dataclass(frozen=True)
class Option:
    """One option of a stage's command: argparse's `add_argument(*flags, **settings)`; its
    value is passed to the stage's `run` under the option's dest."""

    flags: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


def shard_option(meaning: str) -> Option:
    """`--shard I/N`: the option of every sharded stage (a cluster task's share of the work)."""
    return Option(("--shard",), {"type": shard_spec, "default": ShardSpec(), "metavar": "I/N",
                                 "help": f"{meaning} (default: 0/1, everything)"})  # fmt: skip


# --- the declaration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., Summary]
    # The key of everything its result is computed from (inputs' bytes, settings); stage.json
    # records it, and the result is current only while it is the same (synthflux.lineage).
    key: Callable[[PipelineConfig], str]
    folder: Callable[[DataLayout], Path]  # where it writes; its stage.json is there
    results: Callable[[PipelineConfig], list[Path]]  # the files later stages read
    help: str  # one line, for `synthflux --help`
    description: str  # for `synthflux NAME --help`
    needs: tuple[str, ...] = ()  # the stages whose results it reads
    # Done per task of n: images made, shards written, ... None: one job, done when current.
    state: Callable[[PipelineConfig, int], StageState] | None = None
    options: tuple[Option, ...] = ()
    sharded: bool = False  # runs as N tasks (`--shard I/N`) on a cluster, else as one job
    # True: run() itself keeps verified work and says so, so `synthflux run` always calls it;
    # False: `synthflux run` calls it only when its result is not current.
    resumes: bool = False
    # It trains or runs the CNN, or reads results that belong to a backend (evaluate):
    # --backend/--image are its options, and submit passes the nodes' backend.
    runs_cnn: bool = False
    uses_gpu: bool = False  # on a cluster, its tasks get --gpus-per-task
    spreads: bool = False  # its share splits over `[generate] devices` (--devices; devices.py)
    node_args: str = ""  # more arguments for its cluster tasks (shell words)
    unit: str = "results"  # what state() counts: "images", "output shards"
    product: str = "results"  # what it makes, for a person: "images", "predictions"
    # False: the config does not use it (generate, for a config that trains on real images)
    applies: Callable[[PipelineConfig], bool] = lambda cfg: True

    def marker(self, layout: DataLayout) -> Path:
        """Its stage.json: written last, the done marker."""
        return layout.stage_marker(self.folder(layout))


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
