"""Is a stage's result current? One answer for every stage, read from its stage.json.

A result is current when its stage.json says it is complete, records the key the stage
declares for the config now (`Stage.key`: every input's bytes and the settings), and every
output file it lists still has the sha256 it had when it was published. A stage asks
`require(cfg, need, by=...)` before it reads another stage's results, and never imports that
stage: the registry (`pipeline.STAGES`) knows them all.

    generate ─┐                       ┌─ evaluate ─┐
              ├─ preprocess ─ train ─ classify ────┴─ report
    import ───┘      (each arrow: stage.json's key and outputs, checked here)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthflux.config import PipelineConfig
from synthflux.errors import DataError
from synthflux.layout import SourcePaths
from synthflux.stages import ShardState, StageState, read_stage_marker, write_stage_marker
from synthflux.storage import sha256_file

if TYPE_CHECKING:
    from synthflux.stages import Stage

# What a key may raise while its inputs are missing or damaged: then nothing is current.
UNREADABLE_INPUTS = (OSError, ValueError, DataError, KeyError, TypeError)


def stage(name: str) -> Stage:
    from synthflux.pipeline import stage as registered  # the registry imports every stage

    return registered(name)


def marker(cfg: PipelineConfig, name: str) -> dict[str, Any] | None:
    return read_stage_marker(stage(name).marker(cfg.layout))


def record(
    cfg: PipelineConfig,
    name: str,
    *,
    key: str,
    seconds: float,
    outputs: list[Path],
    complete: bool = True,
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stage's stage.json, last: the key it computed from, and each output's sha256
    (paths relative to the data root), so that a later change to any of them is seen."""
    layout = cfg.layout
    digests = {layout.relative(p): sha256_file(p) for p in outputs}
    return write_stage_marker(
        stage(name).marker(layout), name, key=key, seconds=seconds, complete=complete,
        facts={**(facts or {}), "outputs": digests},
    )  # fmt: skip


def problem(cfg: PipelineConfig, name: str) -> str | None:
    """Why the stage's result is not current for `cfg` (None: it is), in words for a person."""
    st, layout = stage(name), cfg.layout
    if not layout.root.is_dir():
        return (
            f"data root {layout.root} does not exist: run `synthflux {name}` first"
            f"{_before(cfg, name)}"
        )
    for path in st.results(cfg):
        if not path.is_file():
            return f"{path} not found: run `synthflux {name}` first{_before(cfg, name)}"
    found = read_stage_marker(st.marker(layout))
    if found is None:
        return f"{st.marker(layout)} not found: run `synthflux {name}` first{_before(cfg, name)}"
    if not found.get("complete"):
        return f"{name} is incomplete: run `synthflux {name}` to finish it first"
    outputs = found.get("outputs") or {}
    for rel, digest in outputs.items():
        try:
            same = sha256_file(layout.root / rel) == digest
        except OSError:
            return f"{layout.root / rel} not found: run `synthflux {name}` again"
        if not same:
            return f"{layout.root / rel} changed since {name} wrote it: run `synthflux {name}` to rebuild it"
    try:
        key = st.key(cfg)
    except UNREADABLE_INPUTS as e:
        return f"{name}'s inputs are not readable ({e}): run `synthflux {name}`"
    if found.get("key") != key or not outputs:
        return (
            f"{st.folder(layout)} was not made by {name} from the current inputs and settings: "
            f"run `synthflux {name}`"
        )
    return None


def _before(cfg: PipelineConfig, name: str) -> str:
    """For a stage that never ran: the stages it comes after, which `synthflux run` does too."""
    chain: list[str] = []

    def visit(n: str) -> None:
        for need in stage(n).needs:
            if stage(need).applies(cfg) and need not in chain:
                visit(need)
                chain.append(need)

    visit(name)
    return f" (after {', '.join(chain)}; `synthflux run` runs them in order)" if chain else ""


def is_current(cfg: PipelineConfig, name: str) -> bool:
    return problem(cfg, name) is None


def require(cfg: PipelineConfig, need: str) -> None:
    """A clear error unless `need`'s result is current: the caller is about to read it."""
    if stage(need).applies(cfg) and (why := problem(cfg, need)) is not None:
        raise DataError(why)


def require_imported(source: SourcePaths) -> None:
    """A clear error unless the import of `source` finished and its manifest is unchanged."""
    found = read_stage_marker(source.marker)
    if found is None or not found.get("complete") or not source.manifest.is_file():
        raise DataError(
            f"{source.folder}: the import of {source.name!r} did not finish: run `synthflux "
            "import` for it again"
        )
    if found.get("manifest_sha256") != sha256_file(source.manifest):
        raise DataError(f"{source.manifest} changed since it was imported: import it again")


def one_job_state(cfg: PipelineConfig, name: str, total: int = 1) -> StageState:
    """The state of a stage that runs as one job, counting `total` things it makes: complete
    when its result is current."""
    why = problem(cfg, name)
    return StageState(
        name, [ShardState(0, total if why is None else 0, total)], why is None, why or ""
    )


def state(cfg: PipelineConfig, name: str, n: int) -> StageState:
    """What `status` shows: the stage's own count of work done over n tasks, else one job."""
    st = stage(name)
    return st.state(cfg, n) if st.state is not None else one_job_state(cfg, name)
