"""GPU throughput: `synthflux generate` on a Stable-Diffusion-1.5-sized pipeline (random
weights, built offline: throughput does not depend on the values) against a bare diffusers
loop making the same images, and the per-class LoRA fit's steps/s (finetune method "lora").

    python bench/gpu.py                  # on a CUDA GPU: 512x512, 25 steps, fp16, batch 8
    python bench/gpu.py --batch-size 16
    python bench/gpu.py --toy            # the tiny model on the CPU (CI runs this)

Without a CUDA GPU it says so and measures the toy size instead: those figures say the script
works, nothing about a GPU. Goals on one H100: >= 4 img/s, overhead (synthflux / bare) <= 1.05.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_overhead import bare, ours, sd15_shaped_model

from synthflux import finetune, ingest
from synthflux.config import load_config
from synthflux.diffusion import resolve_model


def config(work: Path, model: str, size: int, args: argparse.Namespace) -> Path:
    raw = {
        "data_root": str(work / "data"), "seed": 1, "images_per_class": args.images // 2,
        "classes": [{"name": "a", "prompts": ["a red apple"]}, {"name": "b", "prompts": ["a green pear"]}],
        "generate": {"model": model, "steps": args.steps, "width": size, "height": size,
                     "batch_size": args.batch_size, "guidance_scale": 7.5},
        "finetune": {"method": "lora", "steps": args.fit_steps, "batch_size": args.fit_batch,
                     "checkpoint_every": 10_000, "rank": 4},
    }  # fmt: skip
    path = work / "bench.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def real_images(folder: Path, size: int) -> Path:
    """Eight smooth random images per class, as an ImageFolder (the fit's speed does not depend
    on what they show)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(
                folder / c / f"{i}.png"
            )
    return folder


def generation(path: Path, rounds: int) -> tuple[float, float]:
    """Median seconds of the bare loop and of synthflux generate, alternated (the pipeline
    loaded once per round by each)."""
    cfg = load_config(path)
    plain = cfg.model_copy(update={"finetune": None})  # generate from the base model
    model = resolve_model(plain).path
    bare(plain, model)  # warm-up: kernels picked, files cached
    ours(plain)
    t_bare, t_ours = [], []
    for _ in range(rounds):
        t_bare.append(bare(plain, model))
        t_ours.append(ours(plain))
    return statistics.median(t_bare), statistics.median(t_ours)


def lora_fit(path: Path, work: Path, size: int) -> tuple[float, int]:
    """(seconds, steps) of fitting both classes' LoRA, loading the model once included."""
    cfg = load_config(path)
    ingest.run(cfg, real_images(work / "real", size), split="train")
    summary = finetune.run(cfg)
    return summary.seconds, summary.steps


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="the tiny model at 32x32 on the CPU")
    parser.add_argument("--images", type=int, default=64, help="images per round (two classes)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=50, help="LoRA steps per class")
    parser.add_argument("--fit-batch", type=int, default=8)
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.toy
    if not gpu:
        if not args.toy:
            print("no CUDA GPU here: measuring the toy size on the CPU instead (not GPU figures)")
        args.images, args.steps, args.rounds, args.fit_steps = min(args.images, 8), 2, 1, 4
        args.batch_size, args.fit_batch = min(args.batch_size, 4), 2
    work = Path(tempfile.mkdtemp(prefix="synthflux-gpu-bench-"))
    try:
        size = 512 if gpu else 32
        model = str(sd15_shaped_model(work / "sd15")) if gpu else "tiny"
        path = config(work, model, size, args)
        b, o = generation(path, args.rounds)
        fit_s, fit_steps = lora_fit(path, work, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name(0) if gpu else "CPU"
    shape = "SD-1.5-shaped, random weights" if gpu else "tiny"
    dtype = "fp16" if gpu else "fp32"
    print(f"device: {where}; model: {shape}, {size}x{size}, {args.steps} steps, {dtype}, "
          f"batch {args.batch_size}, {args.images} images, median of {args.rounds} rounds")  # fmt: skip
    print(f"bare diffusers pipe(...): {b:8.2f} s  {args.images / b:8.2f} img/s")
    print(f"synthflux generate:       {o:8.2f} s  {args.images / o:8.2f} img/s"
          + ("  (goal >= 4 img/s on one H100)" if gpu else ""))  # fmt: skip
    print(f"overhead ratio (synthflux / bare): {o / b:.3f}  (goal <= 1.05)")
    print(f"LoRA fit (2 classes, batch {args.fit_batch}, rank 4): {fit_steps} steps in "
          f"{fit_s:.1f} s = {fit_steps / fit_s:.2f} steps/s (loading the model once included)")  # fmt: skip


if __name__ == "__main__":
    main()
