"""Backend "none": nothing runs here; another process ran flux_model.jl (compose's julia
services), and its files are collected and checked like any backend's output.

classify: the probabilities already in DATA/predictions/<source>/. train: the trainer's files
already in DATA/training/run/, made from DATA/training/job.args (`flux_model.jl @job.args`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from synthflux.backends.job import Job
from synthflux.config import PipelineConfig
from synthflux.errors import ClassifyError, TrainError
from synthflux.layout import probs_file


@dataclass(frozen=True)
class Collect:
    cfg: PipelineConfig

    def train(self, job: Job) -> None:
        """The trainer's files must be in place already."""
        missing = [name for name in job.outputs if not (job.output / name).is_file()]
        if missing:
            raise TrainError(
                f"{job.output} has no {', '.join(missing)} yet: backend 'none' only collects "
                f"what another process trained; run `julia julia/flux_model.jl "
                f"@{self.cfg.layout.job_args}` (compose: the train service), then this again"
            )

    def ready(self) -> None:
        """Always: it needs nothing outside this process."""

    def classify(self, job: Job) -> None:
        """Link the probabilities another process wrote into the job's output folder."""
        source = job.inputs[0][0]
        for shard in job.shards:
            src = self.cfg.layout.predicted(source) / probs_file(shard)
            if not src.is_file():
                raise ClassifyError(
                    f"{src} not found: backend 'none' only collects outputs that the classifier "
                    "already wrote (run the julia service or another backend first)"
                )
            dest = job.output / probs_file(shard)
            try:  # same file system: a link, not a copy of every file
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
