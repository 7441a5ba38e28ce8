"""Training speed and memory, measured side by side in one run (not a timed test).

    .venv/bin/python bench/train_throughput.py [--images 4000] [--epochs 3] [--size 32]
    SYNTHFLUX_JULIA=/path/to/julia .venv/bin/python bench/train_throughput.py   # with Julia

Prints three ratios:

1. Julia (Flux, `flux_model.jl train`) vs the PyTorch twin: training images/s at one thread
   each (JULIA_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1; the twin always trains on one), on the
   same shards from the same initial weights, after the first epoch (which compiles).
   Goal >= 1.0. Needs $SYNTHFLUX_JULIA (a julia with Flux and NPZ); skipped otherwise.
2. The driver's overhead: `synthflux train --backend reference` end to end (checks, initial
   weights, the trainer, checking and publishing its files) over a bare PyTorch loop doing the
   same steps on data already in memory (torch.optim.AdamW). Goal <= 1.10.
3. Peak RSS of `synthflux train` at two dataset sizes (N and 8N images). Goal <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tomli_w
from PIL import Image

from synthflux import ingest, preprocess
from synthflux.config import load_config
from synthflux.weights import init_weights

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"c{i}" for i in range(10)]


def dataset(root: Path, n: int, size: int, epochs: int) -> Path:
    """n random images in 10 classes, imported and preprocessed; returns the config path."""
    rng = np.random.default_rng(n)
    folder = root / "folder"
    for i in range(n):
        c = CLASSES[i % 10]
        (folder / c).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        pixels[: size // 2, : (i % 10) + 1] = 255  # something learnable per class
        Image.fromarray(pixels, mode="L").save(folder / c / f"{i}.png")
    raw = {"data_root": str(root / "data"), "classes": [{"name": c} for c in CLASSES],
           "preprocess": {"width": size, "height": size, "shard_size": 1000},
           "train": {"sources": ["real"], "epochs": epochs, "batch_size": 64, "patience": 0,
                     "val_fraction": 0.0},
           "cnn": {"backend": "reference", "julia": os.environ.get("SYNTHFLUX_JULIA", "julia")}}  # fmt: skip
    path = root / "bench.toml"
    path.write_text(tomli_w.dumps(raw))
    cfg = load_config(path)
    ingest.run(cfg, folder, split="train")
    preprocess.run(cfg)
    return path


def synthflux_train(
    path: Path, backend: str, env: dict[str, str] | None = None
) -> tuple[float, int, list[dict]]:
    """(wall seconds, peak RSS of the process tree, metrics) of `synthflux train`."""
    cfg = load_config(path)
    run = cfg.layout.training
    subprocess.run(["rm", "-rf", str(run)], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "synthflux", "train", str(path), "--backend",
                             backend], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})  # fmt: skip
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"synthflux train --backend {backend} failed ({proc.returncode})")
    lines = (cfg.layout.training_run / "metrics.jsonl").read_text().splitlines()
    return seconds, peak, [json.loads(line) for line in lines]


def bare_loop(path: Path) -> float:
    """Wall seconds of a bare script (a process of its own, as `synthflux train` is)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--bare", str(path)], check=True, cwd=REPO)
    return time.perf_counter() - start


def bare(path: Path) -> None:
    """The same steps as the twin, written as a first script would: every shard in memory,
    torch.optim.AdamW, one thread."""
    import torch
    import torch.nn.functional as F

    from synthflux import reference

    cfg = load_config(path)
    layout = cfg.layout
    torch.set_num_threads(1)
    images, labels = [], []
    for shard in sorted(layout.prepared("train").folder.glob("shard-*.npz")):
        with np.load(shard) as z:
            images.append(np.ascontiguousarray(z["images"].T))
            labels.append(z["labels"])
    x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    t = cfg.train
    shape = (cfg.preprocess.width, cfg.preprocess.height, 1, len(CLASSES))
    model = reference.build_model(init_weights(*shape, seed=t.seed)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            weight_decay=t.weight_decay)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(t.epochs):
        for batch in torch.randperm(len(y), generator=g).split(t.batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare(args.bare)
    with tempfile.TemporaryDirectory() as tmp:
        small = dataset(Path(tmp) / "small", args.images, args.size, args.epochs)
        print(f"{args.images} images {args.size}x{args.size}x1, 10 classes, {args.epochs} epochs, "
              f"batch 64, on {os.cpu_count()} cores")  # fmt: skip
        # 1. Julia vs the twin, images/s after the first (compiling) epoch, one thread each
        seconds, peak_small, twin = synthflux_train(small, "reference")
        twin_rate = np.mean([m["images_per_s"] for m in twin[1:]])
        print(f"PyTorch twin:  {twin_rate:8.0f} img/s (epochs 2..), {seconds:.1f}s end to end")
        julia = os.environ.get("SYNTHFLUX_JULIA")
        if julia:
            one = {"JULIA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            j_seconds, _, flux = synthflux_train(small, "local", env=one)
            flux_rate = np.mean([m["images_per_s"] for m in flux[1:]])
            print(f"Flux (Julia):  {flux_rate:8.0f} img/s (epochs 2..), {j_seconds:.1f}s end to end "
                  f"(with Julia's start and the first gradient's compile)")  # fmt: skip
            print(
                f"ratio Julia / PyTorch twin, img/s at one thread: {flux_rate / twin_rate:.2f} "
                "(goal >= 1.0)"
            )
        else:
            print("Julia: skipped (set SYNTHFLUX_JULIA to a julia with Flux and NPZ)")
        # 2. the driver's overhead over a bare loop, same steps, same thread count
        loop = bare_loop(small)
        driver, _, _ = synthflux_train(small, "reference")
        print(
            f"bare PyTorch loop {loop:.2f}s, synthflux train {driver:.2f}s: overhead "
            f"{driver / loop:.2f}x (goal <= 1.10)"
        )
        # 3. peak memory at 8x the images
        large = dataset(Path(tmp) / "large", 8 * args.images, args.size, 1)
        _, peak_large, _ = synthflux_train(large, "reference")
        _, peak_small, _ = synthflux_train(dataset(Path(tmp) / "small1", args.images, args.size, 1),
                                           "reference")  # fmt: skip
        print(
            f"peak RSS {peak_small / 2**20:.0f} MiB at {args.images} images, "
            f"{peak_large / 2**20:.0f} MiB at {8 * args.images}: ratio "
            f"{peak_large / peak_small:.2f} (goal <= 1.2)"
        )


if __name__ == "__main__":
    main()
