"""Backend "reference": the CNN's PyTorch twin, in-process.

Same files in and out as flux_model.jl; no Julia, no container. classify runs
synthflux.reference, train synthflux.reference_train (docs/training.md, the same rules). The
demo and the Slurm tests use it, and it is the CI-checkable twin of the Julia code.
"""

from __future__ import annotations

from synthflux import reference
from synthflux.backends.job import Job
from synthflux.config import PipelineConfig
from synthflux.progress import Progress
from synthflux.weights import load_weights


def run(cfg: PipelineConfig, job: Job) -> None:
    if job.command == "train":
        from synthflux import reference_train

        reference_train.main(job.args([str(f) for _, f in job.inputs], str(job.weights),
                                      str(job.output))[1:], job.listener)  # fmt: skip
        return
    weights = load_weights(job.weights)
    ((_, folder),) = job.inputs
    with Progress("classify (reference)", len(job.shards), unit="shard") as progress:
        for name in job.shards:
            reference.predict_shard(folder / name, weights, job.output)
            progress.update()
