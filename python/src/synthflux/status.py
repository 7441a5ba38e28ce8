"""`synthflux status`: per stage and per task, what is complete, read from the data.

Each stage answers by its own count of work done (`Stage.state`) and synthflux.lineage's
"is it current?", the same answers `run` uses to skip and `submit --resubmit-failed` uses to
plan; nothing here asks the scheduler. A stage
whose predecessor is incomplete is "waiting": its shards are not known yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from synthflux import lineage, pipeline
from synthflux.config import PipelineConfig
from synthflux.stages import ShardState, StageState
from synthflux.submission import last_backend, last_shards


@dataclass
class Status:
    shards: int
    stages: dict[str, StageState]

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.stages.values())

    def lines(self) -> list[str]:
        out = []
        for st in pipeline.STAGES:
            state = self.stages[st.name]
            head = f"{st.name:<11} {'complete' if state.complete else 'incomplete':<10}"
            if state.waiting:
                out.append(f"{head} waiting for the stage before it")
                continue
            if not state.needed:
                out.append(f"{st.name:<11} not needed by this config")
                continue
            if st.sharded:
                head += f" {sum(s.complete for s in state.shards)}/{len(state.shards)} tasks done"
            out.append((head + (f"  ({state.note})" if state.note else "")).rstrip())
            for s in state.shards:
                where = f"task {s.index}/{self.shards}" if st.sharded else "job"
                mark = "done" if s.complete else "missing"
                out.append(f"  {where:<10} {f'{s.done}/{s.total}':>9} {st.unit:<13} {mark}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "complete": self.complete,
            "stages": {
                name: {
                    "complete": st.complete,
                    "note": st.note,
                    "waiting": st.waiting,
                    "needed": st.needed,
                    "incomplete": st.incomplete(),
                    "shards": [asdict(s) for s in st.shards],
                }
                for name, st in self.stages.items()
            },
        }


def pipeline_status(cfg: PipelineConfig, shards: int) -> Status:
    """Every stage's state, grouped as `shards` tasks; a stage after an incomplete one waits."""
    states: dict[str, StageState] = {}
    ready = True
    for st in pipeline.STAGES:
        n = shards if st.sharded else 1
        if not st.applies(cfg):
            empty = [ShardState(i, 0, 0) for i in range(n)]
            states[st.name] = StageState(st.name, empty, True, needed=False)
            continue
        if ready:
            states[st.name] = lineage.state(cfg, st.name, n)
        else:
            empty = [ShardState(i, 0, 0) for i in range(n)]
            states[st.name] = StageState(st.name, empty, False, waiting=True)
        ready = ready and states[st.name].complete
    return Status(shards, states)


def status_shards(cfg: PipelineConfig, shards: int | None) -> int:
    """--shards, else the last submission's, else 1 (status is the same data either way)."""
    if shards is not None:
        return shards
    return last_shards(cfg.layout) or 1


def status_backend(cfg: PipelineConfig, backend: str | None) -> str | None:
    """--backend, else the last submission's (--classify-backend), else None (the config's)."""
    return backend if backend is not None else last_backend(cfg.layout)
