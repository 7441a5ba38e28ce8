"""The last Slurm submission, DATA/slurm/submission.json: its options and job ids.

`submit` writes it, `submit --resubmit-failed` reuses its options, and `status` reads its task
count and node backend; in a module of its own so that status and slurm need not import each
other.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from synthflux.errors import DataError
from synthflux.layout import DataLayout
from synthflux.storage import write_json_atomic

APPTAINER = "apptainer"  # a --classify-backend of submit's own: the CNN stages see "local"


def read_submission(layout: DataLayout) -> dict[str, Any] | None:
    """The last submission's options and job ids, if any."""
    path = layout.submission
    try:
        submission: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it to submit afresh") from None
    return submission


def record_submission(
    layout: DataLayout, config: str, options: dict[str, Any], jobs: dict[str, Any]
) -> None:
    write_json_atomic(
        layout.submission,
        {
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "options": options,
            "jobs": jobs,
        },
    )


def node_backend(classify_backend: str | None) -> str | None:
    """The `--backend` the CNN stages run with on the nodes (their results record it)."""
    # Under Apptainer, `julia` on PATH is the shim written beside the script.
    return "local" if classify_backend == APPTAINER else classify_backend


def last_shards(layout: DataLayout) -> int | None:
    previous = read_submission(layout)
    return int(previous["options"]["shards"]) if previous else None


def last_backend(layout: DataLayout) -> str | None:
    previous = read_submission(layout) or {}
    return node_backend(previous.get("options", {}).get("classify_backend"))
