"""Where the CNN runs. A backend is an object with `train(job)` and `classify(job)`: it makes
julia/flux_model.jl (or its PyTorch twin) read the job's inputs and weights and write only
`job.output`; the train and classify stages check what it wrote.

    docker     julia/flux_model.jl in a locked-down container of `cnn.image`
    local      julia/flux_model.jl with a local `julia` (`cnn.julia`)
    reference  the same network in PyTorch, in-process (synthflux.reference, reference_train)
    none       nothing runs: collect what another process wrote into DATA/
    auto       (the default) the first of docker, local, reference that can run here: `choose`

docs/classify.md explains the container contract and why each choice was made.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
from typing import Protocol

from synthflux.backends.collect import Collect
from synthflux.backends.docker import Docker
from synthflux.backends.job import Job
from synthflux.backends.local import Local
from synthflux.backends.reference import Reference
from synthflux.config import PipelineConfig

log = logging.getLogger("synthflux")


class CnnBackend(Protocol):
    def train(self, job: Job) -> None: ...

    def classify(self, job: Job) -> None: ...

    def ready(self) -> None:
        """Raise a CnnError, clear and early, if this backend cannot run here."""


BACKENDS: dict[str, type[Docker] | type[Local] | type[Reference] | type[Collect]] = {
    "docker": Docker,
    "local": Local,
    "reference": Reference,
    "none": Collect,
}


def backend_for(cfg: PipelineConfig) -> CnnBackend:
    """The backend [cnn] names (auto: the one `choose` picks)."""
    cfg = choose(cfg)
    return BACKENDS[cfg.cnn.backend](cfg)


def choose(cfg: PipelineConfig, *, quiet: bool = False) -> PipelineConfig:
    """The config with `cnn.backend = "auto"` replaced by the backend that can run here. Its
    results belong to that backend (train and classify keys name it), so every stage of one
    command asks here, and the answer is said once (`quiet`: by the caller, as status does)."""
    if cfg.cnn.backend != "auto":
        return cfg
    backend, why = _detect(cfg.cnn.image, cfg.cnn.julia)
    if not quiet and why not in _said:
        _said.add(why)
        log.info("cnn backend auto: %s (%s; set [cnn] backend to choose)", backend, why)
    return cfg.with_cnn(backend=backend)


_said: set[str] = set()


@functools.cache
def _detect(image: str, julia: str) -> tuple[str, str]:
    """docker if the image is there and the engine answers, else local if a julia with Flux
    and NPZ loads, else reference; and why."""
    if _docker_has(image):
        return "docker", f"Docker image {image!r} found"
    if _julia_has_flux(julia):
        return "local", f"{julia!r} loads Flux and NPZ"
    return "reference", (
        f"no Docker image {image!r} (`make images`) and no julia with Flux and NPZ "
        f"(cnn.julia = {julia!r}): the CNN runs as its PyTorch twin"
    )


def _docker_has(image: str) -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.images.get(image)
        finally:
            client.close()
    except Exception:  # no SDK, no engine, no image, a refused socket: not usable here
        return False
    return True


def _julia_has_flux(julia: str) -> bool:
    """Whether `julia` finds Flux and NPZ in the julia/ project (found, not loaded: loading
    Flux takes a minute on some machines)."""
    from synthflux.backends.local import julia_dir

    exe = shutil.which(julia)
    if exe is None:
        return False
    try:
        project = julia_dir()
        probe = 'exit(any(isnothing, Base.find_package.(["Flux", "NPZ"])) ? 1 : 0)'
        done = subprocess.run(
            [exe, f"--project={project}", "--startup-file=no", "-e", probe],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except Exception:  # no julia/ folder, a julia that hangs or crashes: not usable here
        return False
    return done.returncode == 0


__all__ = ["BACKENDS", "CnnBackend", "Job", "backend_for", "choose"]
