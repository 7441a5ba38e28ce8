"""One machine, every device: a stage's share of the work (`--shard I/N`) split again over
the local devices (`[generate] devices`), one worker process each (synthflux.device_worker).

Worker d of D takes shard I + N*d of N*D: the batches b with b % N == I and (b // N) % D == d.
Together they make exactly the share one process makes, byte for byte (the --shard
contract), and a re-run makes only what is missing. A worker sees one device:
CUDA_VISIBLE_DEVICES names its GPU, or none for "cpu". Its progress comes back as lines on
its stdout, summed into one bar here; its warnings and errors come back on stderr, prefixed
with its device. Ctrl-C or SIGTERM stops every worker (each keeps what it made); a worker
that fails is one line naming its device, once the others have finished.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from synthflux.config import PipelineConfig
from synthflux.errors import ModelError, SynthfluxError
from synthflux.progress import LINES, Progress, plural
from synthflux.storage import ShardSpec

log = logging.getLogger("synthflux")

STOP_GRACE_S = 120  # a stopped worker writes what it made; then it is killed


class WorkerFailed(SynthfluxError):
    """A device worker exited with an error or was killed."""


@dataclass
class Worker:
    device: str
    shard: ShardSpec
    proc: subprocess.Popen[str]
    summary: dict[str, Any] = field(default_factory=dict)
    last_error: str = ""


def resolve(devices: str | list[str]) -> list[str]:
    """`[generate] devices` as device names, checked against what PyTorch sees here."""
    import torch

    count = torch.cuda.device_count()
    if devices == "all":
        if count == 0:
            raise ModelError('generate.devices = "all": PyTorch sees no CUDA GPU here; list '
                             'devices (e.g. ["cpu"]) or leave devices out')  # fmt: skip
        return [f"cuda:{i}" for i in range(count)]
    for name in devices:
        if name.startswith("cuda:") and int(name.split(":")[1]) >= count:
            seen = f"cuda:0 to cuda:{count - 1}" if count else "none"
            raise ModelError(f"generate.devices: {name!r} is not visible here (PyTorch sees "
                             f"{count} CUDA GPUs: {seen})")  # fmt: skip
    return list(devices)


def one_process(cfg: PipelineConfig) -> PipelineConfig:
    """The config a worker (or the merge after them) runs: no devices of its own."""
    return cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"devices": None})})


def spread(
    stage: str,
    cfg: PipelineConfig,
    shard: ShardSpec,
    desc: str,
    options: Callable[[ShardSpec], dict[str, Any] | None] = lambda sub: {},
) -> list[dict[str, Any]]:
    """Run `stage` on `shard`, one worker per device, each with `options(its shard)` (None:
    that worker has nothing to do); the workers' summaries. The bar sums the workers' bars
    whose name starts with `desc`."""
    assert cfg.generate.devices is not None
    names = resolve(cfg.generate.devices)
    job = {"stage": stage, "config": json.loads(one_process(cfg).model_dump_json())}
    events: queue.Queue[tuple[int, str, str | None]] = queue.Queue()
    workers: list[Worker] = []
    for d, device in enumerate(names):
        sub = sub_shard(shard, d, len(names))
        if (more := options(sub)) is None:
            continue
        workers.append(_start(device, sub, {**job, "shard": [sub.index, sub.count],
                                            "options": more}, events, len(workers)))  # fmt: skip
    with Progress(desc, 0) as progress:
        try:
            _follow(workers, events, progress, desc)
        except KeyboardInterrupt:
            _stop(workers)
            raise
    failed = [w for w in workers if w.proc.returncode != 0]
    if failed:
        said = "; ".join(f"the worker on {w.device} (shard {w.shard}) {_why(w)}" for w in failed)
        raise WorkerFailed(f"{stage}: {said}; the other workers finished: re-run to make what "
                           "is missing")  # fmt: skip
    return [w.summary for w in workers]


def sub_shard(shard: ShardSpec, d: int, count: int) -> ShardSpec:
    """Worker d of `count`'s part of `shard`: the batches b with b % N == I, (b // N) % D == d."""
    return ShardSpec(shard.index + shard.count * d, shard.count * count)


def _start(
    device: str, shard: ShardSpec, job: dict[str, Any], events: queue.Queue[Any], i: int
) -> Worker:
    env = {**os.environ, LINES: "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # PyTorch then sees no GPU: "auto" is the CPU
    else:  # cuda:k counts the GPUs this process sees; the worker sees that one alone
        k, visible = int(device.split(":")[1]), os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[k] if visible else str(k)
    proc = subprocess.Popen(
        [sys.executable, "-m", "synthflux.device_worker"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the workers
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(job))
    proc.stdin.close()
    for name, stream in (("out", proc.stdout), ("err", proc.stderr)):
        threading.Thread(target=_read, args=(i, name, stream, events), daemon=True).start()
    return Worker(device, shard, proc)


def _read(i: int, name: str, stream: IO[str], events: queue.Queue[Any]) -> None:
    for line in stream:
        events.put((i, name, line))
    events.put((i, name, None))


def _follow(workers: list[Worker], events: queue.Queue[Any], progress: Progress, desc: str) -> None:
    """Until every worker's streams close: progress into the bar, stderr through."""
    open_streams = 2 * len(workers)
    while open_streams:
        try:
            i, name, line = events.get(timeout=0.5)  # (a timeout: Ctrl-C is taken promptly)
        except queue.Empty:
            continue
        w = workers[i]
        if line is None:
            open_streams -= 1
        elif name == "err":
            sys.stderr.write(f"[{w.device}] {line}")
            w.last_error = line.strip() or w.last_error
        elif line.count("\t") >= 2:
            kind, value, what = line.rstrip("\n").split("\t", 2)
            if kind == "summary":
                w.summary = json.loads(value)
            elif what.startswith(desc) and kind == "total":
                progress.grow(int(value))
            elif what.startswith(desc):
                progress.update(int(value))
    for w in workers:
        w.proc.wait()


def _stop(workers: list[Worker]) -> None:
    """SIGTERM to each: it keeps what it made. A worker that does not end in STOP_GRACE_S,
    or a second Ctrl-C, is killed (what it made is still on disk: a re-run verifies it)."""
    live = [w for w in workers if w.proc.poll() is None]
    for w in live:
        w.proc.send_signal(signal.SIGTERM)
    if live:
        log.warning("stopping %s: each keeps what it made (up to %d s; Ctrl-C again kills "
                    "them)", plural(len(live), "worker"), STOP_GRACE_S)  # fmt: skip
    try:
        for w in live:
            w.proc.wait(timeout=STOP_GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        for w in live:
            w.proc.kill()
            w.proc.wait()


def _why(w: Worker) -> str:
    code = w.proc.returncode
    if code < 0:
        return f"was killed ({signal.Signals(-code).name})"
    if code == 130:  # its SIGINT/SIGTERM: stopped the way a Ctrl-C stops a run
        return "was stopped (SIGINT or SIGTERM), keeping what it made"
    return f"failed (exit {code})" + (f": {w.last_error}" if w.last_error else "")
