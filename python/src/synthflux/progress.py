"""Progress for long loops: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("synthflux")

LINES = "SYNTHFLUX_PROGRESS_LINES"  # "1": progress as "total|done<TAB>n<TAB>desc" lines

T = TypeVar("T")


class Progress:
    """`with Progress("generate", total, unit="img") as p: p.update(n)`."""

    def __init__(self, desc: str, total: int, unit: str = "img", every_s: float = 10.0):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.done = 0
        self.postfix = ""  # e.g. a fit's loss, shown after the count
        self.start = self.last_log = time.monotonic()
        # A device worker's progress goes to its parent as lines on stdout (devices.py).
        self.lines = os.environ.get(LINES) == "1"
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
            if sys.stderr.isatty() and not self.lines
            else None
        )
        self._line("total", total)

    def _line(self, kind: str, n: int) -> None:
        if self.lines:
            print(f"{kind}\t{n}\t{self.desc}", flush=True)

    def grow(self, n: int) -> None:
        """More to do than `total` said (a worker's share, known once it has looked)."""
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.lines:
            self._line("done", n)
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s or self.done == self.total:
            self.last_log = now
            log.info("%s: %s", self.desc, self.status())

    def note(self, text: str) -> None:
        """Show `text` after the count (on the bar now; in the next log line otherwise)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def counting(self, items: Iterable[T]) -> Iterator[T]:
        """The items, one update each as it is taken."""
        for item in items:
            self.update()
            yield item

    def status(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        note = f", {self.postfix}" if self.postfix else ""
        return (
            f"{self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, ETA {eta:.0f}s{note})"
        )

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def plural(n: int, word: str) -> str:
    """'1 shard', '3 shards'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def quiet_library_progress() -> None:
    """Silence diffusers'/transformers' per-component bars: our bar counts images instead."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
