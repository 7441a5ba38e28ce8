"""Forward-pass images/s of the Flux CNN (julia/flux_model.jl) vs its PyTorch reference.

Same weights.npz, same shards, CPU, the same thread count for both (JULIA_NUM_THREADS and
OPENBLAS_NUM_THREADS for Julia, torch.set_num_threads / OMP_NUM_THREADS for torch), in one run:

* forward only: Julia's own timing of its forward passes (after its warm-up compile, from the
  summary line) vs torch's `reference.predict` timed in this process after a warm-up batch;
* end to end: wall time of each CLI as a fresh process (start-up, imports, reading the shards,
  the forward pass, writing .probs.npz): `julia flux_model.jl` vs `python -m synthflux.reference`.

    python bench/julia_vs_torch.py [--images 2000] [--size 64] [--channels 1] [--threads 1]

Julia is $SYNTHFLUX_JULIA or `julia` on PATH; without one that loads Flux and NPZ this prints
why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from synthflux import reference
from synthflux.weights import init_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
JULIA_PROJECT = REPO / "julia"
SUMMARY = re.compile(r"forward pass: ([\d.]+) s, ")


def find_julia() -> tuple[str | None, str]:
    name = os.environ.get("SYNTHFLUX_JULIA", "julia")
    exe = shutil.which(name)
    if exe is None:
        return None, f"{name!r} is not on PATH (set SYNTHFLUX_JULIA)"
    probe = [exe, f"--project={JULIA_PROJECT}", "-e", "using Flux, NPZ"]
    r = subprocess.run(probe, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        return None, f"{exe} cannot load Flux and NPZ: {r.stderr.strip().splitlines()[-1:]}"
    return exe, ""


def write_shards(folder: Path, images: np.ndarray, shard_size: int) -> None:
    folder.mkdir(parents=True)
    n = images.shape[3]
    for k, start in enumerate(range(0, n, shard_size)):
        part = np.asfortranarray(images[..., start : start + shard_size])
        ids = np.arange(start, start + part.shape[3], dtype=np.int64)
        np.savez(folder / f"shard-{k:05d}.npz", images=part, labels=ids % 2, ids=ids)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}")
    return seconds, r.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="width = height")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    julia, reason = find_julia()
    if julia is None:
        print(f"julia_vs_torch: skipped, no Julia with Flux and NPZ: {reason}")
        return 0

    import torch

    n, size, c, threads = args.images, args.size, args.channels, args.threads
    torch.set_num_threads(threads)
    env = {
        **os.environ,
        "JULIA_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    images = np.asfortranarray(
        np.random.default_rng(0).standard_normal((size, size, c, n)), dtype=np.float32
    )
    weights = init_weights(size, size, c, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights_file = root / "weights.npz"
        save_weights(weights_file, weights)
        write_shards(root / "shards", images, shard_size=1000)

        # torch, in process: warm up on one batch, then time the forward pass over all images.
        model = reference.build_model(weights)
        reference.predict(weights, images[..., : args.batch_size], args.batch_size, model)
        t = time.perf_counter()
        torch_probs = reference.predict(weights, images, args.batch_size, model)
        torch_forward_s = time.perf_counter() - t

        julia_cmd = [julia, f"--project={JULIA_PROJECT}", str(JULIA_PROJECT / "flux_model.jl")]
        julia_cmd += ["--input", str(root / "shards"), "--weights", str(weights_file)]
        julia_cmd += ["--output", str(root / "julia"), "--batch-size", str(args.batch_size)]
        julia_wall_s, julia_out = timed(julia_cmd, env)
        match = SUMMARY.search(julia_out)
        if not match:
            sys.exit(f"no 'forward pass' line in Julia's summary:\n{julia_out}")
        julia_forward_s = float(match.group(1))

        torch_cmd = [sys.executable, "-m", "synthflux.reference", "--input", str(root / "shards")]
        torch_cmd += ["--weights", str(weights_file), "--output", str(root / "torch")]
        torch_wall_s, _ = timed(torch_cmd, env)

        julia_probs = np.concatenate(
            [np.load(p)["probs"] for p in sorted((root / "julia").glob("*.probs.npz"))]
        )
        max_diff = float(np.abs(julia_probs - torch_probs).max())

    def rate(seconds: float) -> float:
        return n / seconds if seconds > 0 else float("inf")

    print(f"julia_vs_torch: {n} images {size}x{size}x{c}, batch {args.batch_size}, "
          f"{threads} thread(s), CPU; torch {torch.__version__}")  # fmt: skip
    print(f"  {'':34}{'julia (Flux)':>14}{'torch':>14}{'julia/torch':>13}")
    rows = [
        ("forward pass only, img/s", rate(julia_forward_s), rate(torch_forward_s)),
        ("whole CLI run incl. start-up, img/s", rate(julia_wall_s), rate(torch_wall_s)),
    ]
    for label, j, t in rows:
        print(f"  {label:34}{j:14.1f}{t:14.1f}{j / t:12.2f}x")
    print(f"  julia wall time {julia_wall_s:.1f} s, of which forward pass {julia_forward_s:.2f} s")
    print(
        f"  torch wall time {torch_wall_s:.1f} s, forward pass in process {torch_forward_s:.2f} s"
    )
    print(f"  max |julia - torch| probability difference: {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
