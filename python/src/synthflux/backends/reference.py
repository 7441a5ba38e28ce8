"""Backend "reference": the CNN's PyTorch twin, in-process.

Same files in and out as flux_model.jl; no Julia, no container. classify runs
synthflux.reference, train synthflux.reference_train (docs/training.md, the same rules). The
demo and the Slurm tests use it, and it is the CI-checkable twin of the Julia code.
"""

from __future__ import annotations

from dataclasses import dataclass

from synthflux import reference
from synthflux.backends.job import Job
from synthflux.config import PipelineConfig
from synthflux.progress import Progress
from synthflux.weights import load_weights


@dataclass(frozen=True)
class Reference:
    cfg: PipelineConfig

    def train(self, job: Job) -> None:
        from synthflux import reference_train

        if job.settings is None:
            raise job.error("a training job without settings")
        emit = reference_train.emitter(job.listener)
        reference_train.train(list(job.inputs), job.weights, job.output, job.settings, emit)

    def ready(self) -> None:
        """Always: it needs nothing outside this process."""

    def classify(self, job: Job) -> None:
        weights = load_weights(job.weights)
        ((_, folder),) = job.inputs
        with Progress("classify (reference)", len(job.shards), unit="shard") as progress:
            for name in job.shards:
                reference.predict_shard(folder / name, weights, job.output)
                progress.update()
