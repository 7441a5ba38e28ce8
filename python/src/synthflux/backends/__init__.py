"""Where the CNN runs. Every backend is one function, `run(cfg, job) -> None`, that makes the
classifier read `job.inputs` and `job.weights` and write one `.probs.npz` per shard into
`job.output` (the only folder it may write); the classify stage checks what it wrote.

    docker     julia/flux_model.jl in a locked-down container of `classify.image`
    local      julia/flux_model.jl with a local `julia` (`classify.julia`)
    reference  the same network in PyTorch, in-process (synthflux.reference)
    none       nothing runs: collect what another process wrote into DATA/predictions

docs/classify.md explains the container contract and why each choice was made.
"""

from __future__ import annotations

from synthflux.backends import collect, docker, local, reference
from synthflux.backends.job import Backend, Job

BACKENDS: dict[str, Backend] = {
    "docker": docker.run,
    "local": local.run,
    "reference": reference.run,
    "none": collect.run,
}

__all__ = ["BACKENDS", "Backend", "Job"]
