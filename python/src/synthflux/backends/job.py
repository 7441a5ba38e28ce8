"""The one signature every backend has: `run(cfg, job) -> None`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synthflux.config import PipelineConfig


@dataclass(frozen=True)
class Job:
    """One classifier run over every shard, as flux_model.jl's command line sees it."""

    inputs: Path  # the folder of shard-*.npz (read-only)
    shards: tuple[str, ...]  # the shard files in it that must be classified
    weights: Path  # read-only
    output: Path  # the only folder the classifier may write
    batch_size: int

    def args(self, inputs: str, weights: str, output: str) -> list[str]:
        """flux_model.jl's arguments, with the paths as the classifier sees them."""
        return ["--input", inputs, "--weights", weights, "--output", output,
                "--batch-size", str(self.batch_size)]  # fmt: skip


Backend = Callable[[PipelineConfig, Job], None]
