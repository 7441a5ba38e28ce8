"""The PyTorch twin of `flux_model.jl train` (julia/src/train.jl): the same rules, the same files.

docs/training.md is the specification both follow: the split, the order of shards and images,
the augmentation, the loss and a hand-written AdamW step, so that from the same initial
weights both take the same steps (tests/fixtures/golden/train/ pins them together). Weights
and optimizer state are kept in Flux's layout in the files, so a checkpoint means the same in
both languages. It holds one shard and one batch in memory. (It reads side by side with
train.jl; the shards, the split and the batches, train.jl's data section, are reference_data.)
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthflux import reference
from synthflux.errors import DataError
from synthflux.reference_data import Shard, batches, nchw, read_shards
from synthflux.storage import atomic_write, hold_point, write_bytes_atomic
from synthflux.trainplan import TrainSettings
from synthflux.weights import Weights, check_weights, load_weights, save_weights

log = logging.getLogger("synthflux")

CHECKPOINT_FORMAT = 1
HISTORY = ("epoch", "steps", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
           "seconds", "images_per_s")  # fmt: skip


Settings = TrainSettings  # the twin's name for them


def parse_args(argv: Sequence[str]) -> tuple[list[tuple[str, Path]], Path, Path, Settings]:
    """flux_model.jl train's command line (without the word `train`)."""
    p = argparse.ArgumentParser(prog="python -m synthflux.reference_train")
    p.add_argument("--input", nargs="+", required=True, metavar="NAME=DIR")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    defaults = Settings()
    for name in Settings.__dataclass_fields__:
        kind = float if isinstance(getattr(defaults, name), float) else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    args = p.parse_args(argv)
    inputs = []
    for item in args.input:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise DataError(f"--input {item!r}: must be NAME=FOLDER")
        inputs.append((name, Path(folder)))
    values = {name: getattr(args, name) for name in Settings.__dataclass_fields__}
    values["flip"] = bool(values["flip"])
    return inputs, args.weights, args.output, Settings(**values)


def main(argv: Sequence[str], listener: Callable[[str], bool] | None = None) -> int:
    """flux_model.jl train's command line, for the golden files and side-by-side checks."""
    inputs, weights, output, settings = parse_args(argv)
    train(inputs, weights, output, settings, emitter(listener))
    return 0


def emitter(listener: Callable[[str], bool] | None) -> Callable[[str], None]:
    """The trainer's lines to `listener`, and to the log unless it used them."""

    def emit(line: str) -> None:
        if listener is None or not listener(line):
            log.info("reference | %s", line)

    return emit


# --- the model and the step ---------------------------------------------------------------


def _flux_to_torch(name: str, a: np.ndarray) -> np.ndarray:
    if name.startswith("conv") and name.endswith("_weight"):  # (kw, kh, cin, cout), flipped
        return np.array(a[::-1, ::-1].transpose(3, 2, 1, 0), order="C", copy=True)
    return np.array(a, order="C", copy=True)


def _torch_to_flux(name: str, a: np.ndarray) -> np.ndarray:
    """A copy, always: `a` is the live parameter's memory (np.asfortranarray returns a 1-D
    bias itself, so a kept "best" bias went on training)."""
    if name.startswith("conv") and name.endswith("_weight"):
        a = a.transpose(3, 2, 1, 0)[::-1, ::-1]
    return np.array(a, order="F", copy=True)


def _parameters(model: Any) -> dict[str, Any]:
    """The torch parameters under their weights.npz names."""
    convs = [m for m in model if m.__class__.__name__ == "Conv2d"]
    dense = next(m for m in model if m.__class__.__name__ == "Linear")
    named = {}
    for i, conv in enumerate(convs, 1):
        named[f"conv{i}_weight"], named[f"conv{i}_bias"] = conv.weight, conv.bias
    named["dense_weight"], named["dense_bias"] = dense.weight, dense.bias
    return named


class AdamW:
    """docs/training.md's step: every scalar from float64 settings, rounded once to float32."""

    def __init__(self, settings: Settings, params: dict[str, Any]) -> None:
        import torch

        self.s, self.params = settings, params
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.step = 0

    def update(self) -> None:
        import torch

        self.step += 1
        s, t = self.s, self.step
        f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        b1, b2, c1, c2 = f32(s.beta1), f32(s.beta2), f32(1 - s.beta1), f32(1 - s.beta2)
        a, r, e = f32(s.lr / (1 - s.beta1**t)), f32(math.sqrt(1 - s.beta2**t)), f32(s.eps)
        decay = f32(1 - s.lr * s.weight_decay)
        with torch.no_grad():
            for name, p in self.params.items():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                m, v = self.m[name], self.v[name]
                m.copy_(b1 * m + c1 * g)
                v.copy_(b2 * v + c2 * (g * g))
                if s.weight_decay > 0:
                    p.copy_(p * decay)
                p.copy_(p - a * m / (torch.sqrt(v) / r + e))


# --- the run ------------------------------------------------------------------------------


@dataclass
class _State:
    epoch: int = 0
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    best_val_loss: float = math.nan
    best: Weights = field(default_factory=dict)
    history: list[list[float]] = field(default_factory=list)


def next_best(
    best_epoch: int, best_val_loss: float, epoch: int, val_loss: float, has_val: bool
) -> tuple[int, float]:
    """The best epoch after `epoch`: the lowest val_loss (the first on ties, NaN never better
    than a number), or, without validation images, the last epoch. (train.jl's `next_best`.)"""
    if not has_val:
        return epoch, math.nan
    if best_epoch == 0 or _isless(val_loss, best_val_loss):
        return epoch, val_loss
    return best_epoch, best_val_loss


def _isless(a: float, b: float) -> bool:
    """Julia's `isless` on floats: NaN sorts after every number."""
    return (not math.isnan(a) and math.isnan(b)) or a < b


def stop_now(state: _State, settings: Settings) -> bool:
    """Asked afresh on every start, with this run's settings: more epochs go on from a run that
    ended at its old limit; one that stopped early stays stopped."""
    return state.epoch >= settings.epochs or (
        settings.patience > 0 and state.bad_epochs >= settings.patience
    )


@contextmanager
def _one_thread() -> Iterator[None]:
    """A CPU's reductions split work by thread count: the same weights on any machine (a
    laptop, a Slurm node with one CPU) are worth more than speed for this twin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def train(
    inputs: list[tuple[str, Path]],
    init: Path,
    output: Path,
    settings: Settings,
    emit: Callable[[str], None],
) -> None:
    """Train from `init` (or resume from output/checkpoint.npz); write output/weights.npz."""
    start_weights = load_weights(init)
    spec = check_weights(start_weights, str(init))
    shards = read_shards(inputs, settings, spec.n_classes)
    model = reference.build_model(start_weights).train()
    params = _parameters(model)
    opt = AdamW(settings, params)
    state = _State(best=dict(start_weights))
    ckpt = output / "checkpoint.npz"
    if ckpt.is_file():
        state = _resume(ckpt, params, opt, spec.to_array())
        if state.epoch > settings.epochs:
            raise DataError(f"{ckpt}: is at epoch {state.epoch}, past --epochs "
                            f"{settings.epochs} (delete it, or the output folder, to start over)")  # fmt: skip
        emit(f"resume: from epoch {state.epoch}")
    # finished (or --epochs 0): the outputs again, nothing to train
    if stop_now(state, settings) and not (ckpt.is_file() and state.finished):
        state.finished = True
        _write_checkpoint(output, spec.to_array(), params, opt, state)
    n_train = sum(int((~s.validation).sum()) for s in shards)
    steps = -(-n_train // settings.batch_size)
    while not stop_now(state, settings):
        t0 = time.monotonic()
        loss, correct = _epoch(model, opt, shards, settings, state.epoch + 1, steps, emit)
        seconds = time.monotonic() - t0
        val_loss, val_acc = _validate(model, shards, settings.batch_size)
        state.epoch += 1
        best_epoch, state.best_val_loss = next_best(
            state.best_epoch, state.best_val_loss, state.epoch, val_loss, not math.isnan(val_acc)
        )
        if best_epoch == state.epoch:
            state.best = {**state.best, **_flux_weights(params)}
        state.best_epoch, state.bad_epochs = best_epoch, state.epoch - best_epoch
        rate = n_train / seconds if seconds > 0 else math.inf
        row = [state.epoch, opt.step, loss / n_train, correct / n_train, val_loss, val_acc,
               seconds, rate]  # fmt: skip
        state.history.append([float(v) for v in row])
        state.finished = stop_now(state, settings)
        _write_checkpoint(output, spec.to_array(), params, opt, state)
        emit("metrics: " + metrics_json(state.history[-1], state.best_epoch))
        hold_point("epoch")
    _write_result(output, state)
    why = (f"after {_epochs(state.epoch)}" if state.epoch >= settings.epochs else
           f"early after epoch {state.epoch} ({_epochs(state.bad_epochs)} without a better val_loss)")  # fmt: skip
    emit(f"done: stopped {why}; best epoch {state.best_epoch} -> {output / 'weights.npz'}")


def _epochs(n: int) -> str:
    return "1 epoch" if n == 1 else f"{n} epochs"


def _write_result(output: Path, state: _State) -> None:
    path = output / "weights.npz"
    if not all(np.isfinite(a).all() for k, a in state.best.items() if k != "arch"):
        raise DataError(f"{path}: not written: the best weights (epoch {state.best_epoch}) hold "
                        "NaN or Inf; training diverged, try a smaller --lr")  # fmt: skip
    save_weights(path, state.best)
    _write_metrics(output, state.history)


def _epoch(
    model: Any, opt: AdamW, shards: list[Shard], settings: Settings, epoch: int, steps: int,
    emit: Callable[[str], None],
) -> tuple[float, int]:  # fmt: skip
    """One pass over the training images; (summed loss, number right)."""
    total_loss, correct, done = 0.0, 0, 0
    every = max(1, steps // 10)
    for x, y in batches(shards, settings, epoch):
        loss_sum, right = _step(model, opt, x, y)
        total_loss, correct, done = total_loss + loss_sum, correct + right, done + 1
        if done % every == 0 or done == steps:
            emit(f"progress: {done}/{steps}")
    return total_loss, correct


def _step(model: Any, opt: AdamW, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    target = torch.from_numpy(y)
    losses = F.cross_entropy(logits, target, reduction="none")
    losses.mean().backward()
    opt.update()
    right = int((logits.argmax(dim=1) == target).sum())
    return float(losses.detach().double().sum()), right


def _validate(model: Any, shards: list[Shard], batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over the validation images (NaN, NaN without any), in batches as
    train.jl's, each image's loss summed in float64."""
    import torch
    import torch.nn.functional as F

    total, right, n = 0.0, 0, 0
    with torch.no_grad():
        for shard in shards:
            rows = np.flatnonzero(shard.validation)
            if not len(rows):
                continue
            pixels = nchw(shard.path)
            for start in range(0, len(rows), batch_size):
                sel = rows[start : start + batch_size]
                x = torch.from_numpy(np.ascontiguousarray(pixels[sel], np.float32))
                y = torch.from_numpy(shard.labels[sel])
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                total += float(losses.double().sum())
                right += int((logits.argmax(dim=1) == y).sum())
                n += len(sel)
    return (total / n, right / n) if n else (math.nan, math.nan)


def _flux_weights(params: dict[str, Any]) -> Weights:
    return {k: _torch_to_flux(k, p.detach().numpy()) for k, p in params.items()}


def metrics_json(row: list[float], best_epoch: int) -> str:
    """A `metrics:` object, as train.jl writes it: this key order, %.9g, null for NaN/Inf."""
    r = dict(zip(HISTORY, row, strict=True))
    fields: list[tuple[str, float | int]] = [
        ("epoch", int(r["epoch"])), ("steps", int(r["steps"])),
        *((k, r[k]) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                              "images_per_s", "seconds")),
        ("best_epoch", best_epoch),
    ]  # fmt: skip

    def number(x: float | int) -> str:
        return str(x) if isinstance(x, int) else f"{x:.9g}" if math.isfinite(x) else "null"

    return "{" + ", ".join(f'"{k}": {number(v)}' for k, v in fields) + "}"


def best_epochs(history: list[list[float]]) -> list[int]:
    """The best epoch after each row of a history (what metrics.jsonl says)."""
    out, best, loss = [], 0, math.nan
    for row in history:
        best, loss = next_best(best, loss, int(row[0]), row[4], not math.isnan(row[5]))
        out.append(best)
    return out


def _write_metrics(output: Path, history: list[list[float]]) -> None:
    lines = (metrics_json(row, b) for row, b in zip(history, best_epochs(history), strict=True))
    write_bytes_atomic(output / "metrics.jsonl", "".join(f"{line}\n" for line in lines).encode())


# --- checkpoint -----------------------------------------------------------------------------


def _write_checkpoint(
    output: Path, arch: np.ndarray, params: dict[str, Any], opt: AdamW, state: _State
) -> None:
    arrays: dict[str, np.ndarray] = {"arch": arch, **_flux_weights(params)}
    for name in params:
        arrays[f"m_{name}"] = _torch_to_flux(name, opt.m[name].numpy())
        arrays[f"v_{name}"] = _torch_to_flux(name, opt.v[name].numpy())
        arrays[f"best_{name}"] = state.best[name]
    arrays["state"] = np.array([CHECKPOINT_FORMAT, state.epoch, opt.step, state.best_epoch,
                                state.bad_epochs, int(state.finished)], np.int64)  # fmt: skip
    arrays["best_val_loss"] = np.array([state.best_val_loss], np.float64)
    arrays["history"] = np.asfortranarray(
        np.array(state.history, np.float64).reshape(-1, len(HISTORY))
    )
    output.mkdir(parents=True, exist_ok=True)
    with atomic_write(output / "checkpoint.npz") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    _write_metrics(output, state.history)


def _resume(path: Path, params: dict[str, Any], opt: AdamW, arch: np.ndarray) -> _State:
    import torch

    with np.load(path, allow_pickle=False) as z:
        ck = {k: z[k] for k in z.files}
    if (
        not np.array_equal(ck.get("arch", np.zeros(0)), arch)
        or int(ck["state"][0]) != CHECKPOINT_FORMAT
    ):
        raise DataError(f"{path}: a checkpoint of another network: delete it to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(_flux_to_torch(name, ck[name])))
            opt.m[name].copy_(torch.from_numpy(_flux_to_torch(name, ck[f"m_{name}"])))
            opt.v[name].copy_(torch.from_numpy(_flux_to_torch(name, ck[f"v_{name}"])))
    _, epoch, step, best_epoch, bad, finished = (int(v) for v in ck["state"])
    opt.step = step
    best = {"arch": arch, **{k: ck[f"best_{k}"] for k in params}}
    history = ck["history"].reshape(-1, len(HISTORY)).tolist()
    return _State(
        epoch, best_epoch, bad, bool(finished), float(ck["best_val_loss"][0]), best, history
    )


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main(sys.argv[1:]))
