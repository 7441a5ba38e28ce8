"""A job for the CNN: one run of julia/flux_model.jl (or its twin), train or classify."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from synthflux.errors import ClassifyError, CnnError, TrainError
from synthflux.trainplan import TrainSettings

# A line the CNN printed; True when the caller used it (a progress line), so it is not logged.
LineListener = Callable[[str], bool]


@dataclass(frozen=True)
class Job:
    """One run of julia/flux_model.jl (or its twin): read `inputs` and `weights`, write only
    `output`. julia/README.md documents both commands."""

    command: Literal["classify", "train"]
    inputs: tuple[tuple[str, Path], ...]  # (source name, folder of shard-*.npz), read-only
    shards: tuple[str, ...]  # classify: the shard files in its one input that must be done
    weights: Path  # read-only
    output: Path  # the only folder the CNN may write
    output_inside: str  # where it is under the data root, as a container sees it
    options: tuple[str, ...] = ()  # further flux_model.jl options, e.g. ("--batch-size", "64")
    outputs: tuple[str, ...] = ()  # the files it must leave in `output`
    timeout_s: int = 3600
    timeout_name: str = "cnn.timeout_s"  # the setting, for the error message
    listener: LineListener | None = field(default=None, compare=False)
    settings: TrainSettings | None = None  # train: what the trainer is told (its options)

    def error(self, message: str) -> CnnError:
        """The error to raise for this job: a TrainError or a ClassifyError."""
        return (TrainError if self.command == "train" else ClassifyError)(message)

    def args(self, inputs: list[str], weights: str, output: str) -> list[str]:
        """flux_model.jl's arguments, with the paths as the CNN sees them."""
        if self.command == "classify":
            head = ["--input", *inputs]
        else:
            named = [f"{name}={path}" for (name, _), path in zip(self.inputs, inputs, strict=True)]
            head = ["train", "--input", *named]
        settings = self.settings.options() if self.settings else ()
        return [*head, "--weights", weights, "--output", output, *self.options, *settings]
