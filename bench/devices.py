"""Every local device against one: `synthflux generate` images/s in one process and with
`[generate] devices` (one worker per device), side by side in one run, on the same images
(their bytes are checked equal).

    python bench/devices.py                  # a CUDA machine: every GPU ("all") vs the first,
                                             # SD-1.5-shaped random model, 512x512, 25 steps, fp16
    python bench/devices.py --cpu-workers 2  # CPU "devices": the workers share the cores, so
                                             # the ratio measures the overhead of the workers

With one GPU or none it measures CPU workers (tiny model, 32x32): those figures say what the
workers cost (each loads the model), nothing about GPUs. On a machine with N GPUs the goal is
a speedup >= 0.9 x N at 512x512 (each worker loads the model once; the images dominate).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_overhead import sd15_shaped_model

from synthflux import generate
from synthflux.config import load_config


def config(work: Path, name: str, model: str, size: int, args: argparse.Namespace,
           devices: str | list[str] | None) -> Path:  # fmt: skip
    raw = {
        "data_root": str(work / name), "seed": 1, "images_per_class": args.images // 2,
        "classes": [{"name": "a", "prompts": ["a red apple"]}, {"name": "b", "prompts": ["a green pear"]}],
        "generate": {"model": model, "steps": args.steps, "width": size, "height": size,
                     "batch_size": args.batch_size, "guidance_scale": 7.5,
                     **({} if devices is None else {"devices": devices})},
    }  # fmt: skip
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def timed(path: Path) -> float:
    cfg = load_config(path)
    shutil.rmtree(cfg.layout.generated, ignore_errors=True)
    start = time.perf_counter()
    generate.run(cfg)
    return time.perf_counter() - start


def images(path: Path) -> dict[str, bytes]:
    folder = load_config(path).layout.generated
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*/*.png"))}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-workers", type=int, default=0,
                        help="measure this many CPU workers against one process")  # fmt: skip
    parser.add_argument("--images", type=int, default=0, help="images per round (two classes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    on_gpus = gpus > 1 and not args.cpu_workers
    if not on_gpus:
        args.cpu_workers = args.cpu_workers or 2
        print(f"{gpus} CUDA GPUs here: measuring {args.cpu_workers} CPU workers against one "
              "process (the overhead of the workers, not GPU figures)")  # fmt: skip
        args.steps, args.batch_size = min(args.steps, 4), min(args.batch_size, 4)
    args.images = args.images or (64 * gpus if on_gpus else 24)
    many = "all" if on_gpus else ["cpu"] * args.cpu_workers
    work = Path(tempfile.mkdtemp(prefix="synthflux-devices-bench-"))
    try:
        size = 512 if on_gpus else 32
        model = str(sd15_shaped_model(work / "sd15")) if on_gpus else "tiny"
        one = config(work, "one", model, size, args, None)
        spread = config(work, "spread", model, size, args, many)
        timed(one)  # warm-up: the model built and cached, kernels picked
        t_one, t_many = [], []
        for _ in range(args.rounds):
            t_one.append(timed(one))
            t_many.append(timed(spread))
        same = images(one) == images(spread)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = gpus if on_gpus else args.cpu_workers
    a, b = statistics.median(t_one), statistics.median(t_many)
    where = f"{n} x {torch.cuda.get_device_name(0)}" if on_gpus else f"{n} CPU workers"
    print(f"{where}; {size}x{size}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.images} images, median of {args.rounds} rounds")  # fmt: skip
    print(f"one process:       {a:8.2f} s  {args.images / a:8.2f} img/s")
    print(f"one per device:    {b:8.2f} s  {args.images / b:8.2f} img/s")
    print(
        f"speedup (one / spread): {a / b:.2f} with {n} devices"
        + (f" (goal >= {0.9 * n:.1f})" if on_gpus else " (CPU: the workers share the cores)")
    )
    print(f"images byte-identical: {same}")
    if not same:
        sys.exit("the spread images differ from one process's")


if __name__ == "__main__":
    main()
