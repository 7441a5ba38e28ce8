"""A device worker, started by synthflux.devices: its job (stage, config, shard, options) as
JSON on stdin; it runs that stage's shard on the one device it sees, reports progress as
lines on stdout (progress.LINES), and ends with its summary ("summary<TAB>json").

`python -m synthflux.device_worker` is not a command for people: `[generate] devices` or
`--devices` start it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from synthflux.config import PipelineConfig
from synthflux.errors import SynthfluxError
from synthflux.pipeline import STAGES
from synthflux.storage import ShardSpec


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)  # what is made is kept, as in the CLI


def _orphaned(parent: int) -> None:
    """A parent killed outright (SIGKILL) cannot stop its workers: they stop themselves (a
    worker that reports progress meets the closed pipe first; this covers a silent stretch,
    such as loading a model)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    threading.Thread(target=_orphaned, args=(os.getppid(),), daemon=True).start()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as the CLI: our lines, not theirs
    logging.basicConfig(level=logging.WARNING, format="synthflux: %(message)s", stream=sys.stderr)
    try:
        job = json.loads(sys.stdin.read())
        cfg = PipelineConfig.model_validate_json(json.dumps(job["config"]))
        stage = next(st for st in STAGES if st.name == job["stage"])
        summary = stage.run(cfg, shard=ShardSpec(*job["shard"]), **job["options"])
    except SynthfluxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"summary\t{json.dumps(vars(summary))}\t", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
