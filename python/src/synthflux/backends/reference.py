"""Backend "reference": the CNN's PyTorch twin (synthflux.reference), in-process.

Same files in and out as flux_model.jl; no Julia, no container. The demo and the Slurm tests
use it, and it is the CI-checkable twin of the Julia code (tests/fixtures/golden/).
"""

from __future__ import annotations

from synthflux import reference
from synthflux.backends.job import Job
from synthflux.config import PipelineConfig
from synthflux.progress import Progress
from synthflux.weights import load_weights


def run(cfg: PipelineConfig, job: Job) -> None:
    weights = load_weights(job.weights)
    with Progress("classify (reference)", len(job.shards), unit="shard") as progress:
        for name in job.shards:
            reference.predict_shard(job.inputs / name, weights, job.output)
            progress.update()
