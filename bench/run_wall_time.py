"""`synthflux run` end to end, backend local (Julia) vs reference (the PyTorch twin), side by
side in one run on an mnist5k-sized job (not a timed test).

    SYNTHFLUX_JULIA=/path/to/julia .venv/bin/python bench/run_wall_time.py [--images 5000]
        [--test-images 1000] [--epochs 15] [--size 28]

(SYNTHFLUX_JULIA=julia/build/bin/julia after `make julia-sysimage`: the julia that the goals
below are met with, julia/README.md "Start-up and training speed".)

The images are scikit-learn's handwritten digits (8x8) drawn at --size with a random shift,
scale and noise per image, 10 classes, imported as the training source "real" and a test set;
each backend gets its own data root and runs the same config (`synthflux run`: preprocess,
train, classify, evaluate, report), so Julia's start and compiling are counted. `julia` is
reached through a wrapper that logs each start. Prints:

1. the wall time of each run and their ratio (goal: local <= 1.5x reference);
2. the number of julia starts in the local run (one per run with `flux_model.jl serve`);
3. training images/s of each (metrics.jsonl, epochs 2.., the threads each uses by default)
   and their ratio (goal: Julia >= 0.8x the twin).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]


def draw_digits(folder: Path, n: int, size: int, seed: int) -> None:
    """n images in folder/<digit>/: a digit drawn larger, shifted, scaled, with noise."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(rng.integers(len(digits.target)))
        small = Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8), mode="L")
        side = int(rng.integers(size * 2 // 3, size + 1))
        canvas = np.zeros((size, size), dtype=np.float64)
        x, y = rng.integers(0, size - side + 1, 2)
        canvas[y : y + side, x : x + side] = np.asarray(small.resize((side, side), Image.BILINEAR))
        canvas += rng.normal(0, 12, canvas.shape)
        label = folder / str(digits.target[k])
        label.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas.clip(0, 255).astype(np.uint8), mode="L").save(label / f"{i}.png")


def write_config(root: Path, backend: str, julia: str, epochs: int, size: int) -> Path:
    raw = {"data_root": str(root / "data"), "classes": [{"name": str(d)} for d in range(10)],
           "preprocess": {"width": size, "height": size, "shard_size": 1000},
           "train": {"sources": ["real"], "epochs": epochs, "patience": 0},
           "cnn": {"backend": backend, "julia": julia}}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bench.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def counting_julia(folder: Path, julia: str) -> tuple[Path, Path]:
    """A `julia` that logs each start to folder/starts.log, then runs the real one."""
    real = shutil.which(julia) or julia
    log, exe = folder / "starts.log", folder / "julia"
    exe.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    exe.chmod(0o755)
    return exe, log


def synthflux(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "synthflux", *args], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"synthflux {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def timed_run(
    root: Path, train: Path, test: Path, backend: str, julia: str, a: argparse.Namespace
) -> dict:
    """Import both folders, then time `synthflux run`; its wall time and training img/s."""
    path = write_config(root, backend, julia, a.epochs, a.size)
    synthflux("import", str(path), str(train), "--as", "train")
    synthflux("import", str(path), str(test), "--as", "test", "--name", "heldout")
    start = time.perf_counter()
    synthflux("run", str(path))
    seconds = time.perf_counter() - start
    metrics = root / "data" / "training" / "run" / "metrics.jsonl"
    rates = [json.loads(line)["images_per_s"] for line in metrics.read_text().splitlines()]
    summary = json.loads((root / "data" / "evaluation" / "summary.json").read_text())
    accuracy = summary["splits"]["heldout"]["accuracy"]
    return {"seconds": seconds, "rate": float(np.mean(rates[1:])), "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=28)
    a = parser.parse_args()
    julia = os.environ.get("SYNTHFLUX_JULIA")
    if not julia:
        raise SystemExit("set SYNTHFLUX_JULIA to a julia with Flux and NPZ")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        draw_digits(root / "train", a.images, a.size, seed=0)
        draw_digits(root / "test", a.test_images, a.size, seed=1)
        exe, log = counting_julia(root, julia)
        print(f"{a.images} training + {a.test_images} test images {a.size}x{a.size}, 10 classes, "
              f"{a.epochs} epochs, batch 32, on {os.cpu_count()} cores")  # fmt: skip
        ref = timed_run(root / "reference", root / "train", root / "test", "reference", julia, a)
        loc = timed_run(root / "local", root / "train", root / "test", "local", str(exe), a)
        starts = log.read_text().splitlines() if log.is_file() else []
    for name, r in (("reference (PyTorch twin)", ref), ("local (Julia)", loc)):
        print(f"{name:25s} synthflux run {r['seconds']:7.1f}s, training {r['rate']:7.0f} img/s "
              f"(epochs 2..), held-out accuracy {r['accuracy']:.3f}")  # fmt: skip
    print(f"wall time local / reference: {loc['seconds'] / ref['seconds']:.2f}x (goal <= 1.5)")
    print(f"julia starts in the local run: {len(starts)} (goal 1)")
    print(f"training img/s Julia / twin: {loc['rate'] / ref['rate']:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
