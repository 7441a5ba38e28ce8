"""Backend "none": nothing runs; take the probabilities already in DATA/predictions.

For compose's julia service, which writes them itself: they are checked like any
classifier's output before anything is published.
"""

from __future__ import annotations

import os
import shutil

from synthflux.backends.job import Job
from synthflux.config import PipelineConfig
from synthflux.errors import ClassifyError
from synthflux.layout import DataLayout, probs_file


def run(cfg: PipelineConfig, job: Job) -> None:
    published = DataLayout(cfg.data_root)
    for shard in job.shards:
        src = published.probs(shard)
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
