"""The interface every stage module offers, and the states `status` reports.

A stage is a module with `run(cfg, *, shard=..., ...) -> Summary` (do the missing work, keep
what is verified) and `state(cfg, n) -> StageState` (what is done, grouped as n tasks, by the
stage's own definition of done). `pipeline.STAGES` lists them in order; `run`, `status` and
`submit` loop over that list, so a new stage is one module and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from synthflux.config import PipelineConfig


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
