"""Preprocess throughput and memory, side by side on the same PNGs, in one run.

(a) naive: a first script's loop — open, convert("L"), resize, np.asarray/255, one np.savez
    per image;
(b) `synthflux preprocess` with 1 worker and with every core;
(c) the floor: decoding the same PNGs with Pillow and nothing else.
Each runs in its own subprocess, so peak RSS (ru_maxrss) is its own. A second, larger set
shows whether peak RSS grows with the dataset.

    python bench/preprocess_throughput.py [--images 2000] [--size 512]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

RUNNERS = {
    "naive": """
import sys, json, time, resource, numpy as np
from PIL import Image
from pathlib import Path
root = Path(sys.argv[1]); out = root / "naive"; out.mkdir(exist_ok=True)
recs = [json.loads(l) for l in open(root / "generated/manifest.jsonl")]
t = time.perf_counter()
for r in recs:
    im = Image.open(root / "generated" / r["file"]).convert("L").resize((64, 64))
    np.savez(out / f"{r['id']}.npz", image=np.asarray(im, dtype=np.float32) / 255, label=r["label"])
print(json.dumps({"s": time.perf_counter() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""",
    "decode": """
import sys, json, time, resource
from PIL import Image
from pathlib import Path
root = Path(sys.argv[1])
recs = [json.loads(l) for l in open(root / "generated/manifest.jsonl")]
t = time.perf_counter()
for r in recs:
    Image.open(root / "generated" / r["file"]).load()
print(json.dumps({"s": time.perf_counter() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""",
    "synthflux": """
import sys, json, time, resource, shutil
from synthflux.config import load_config
from synthflux import preprocess
cfg = load_config(sys.argv[2]); shutil.rmtree(cfg.data_root / "preprocessed", ignore_errors=True)
t = time.perf_counter()
preprocess.run(cfg, workers=int(sys.argv[3]))
rss = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"s": time.perf_counter() - t, "rss": rss}))
""",
}


def make_pngs(root: Path, n: int, size: int) -> None:
    """Noise-like RGB PNGs the size Stable Diffusion writes, and their manifest."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    lines = []
    for i in range(n):
        cls = ("a", "b")[i % 2]
        path = root / "generated" / cls / f"{cls}-{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth-ish content (like photos) compresses and decodes like real PNGs; vary per image.
        pixels = np.roll(base, i, axis=1) // 4 + np.uint8(i % 64)
        Image.fromarray(pixels).save(path, compress_level=6)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(
            json.dumps(
                {
                    "id": i,
                    "class": cls,
                    "label": i % 2,
                    "file": f"{cls}/{path.name}",
                    "sha256": digest,
                }
            )
        )
    (root / "generated" / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def run(kind: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUNNERS[kind], *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="PNG side in pixels (SD writes 512)")
    parser.add_argument(
        "--memory-images", type=int, default=20000, help="larger set for the RSS check (small PNGs)"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="synthflux-bench-") as tmp:
        root = Path(tmp)
        make_pngs(root, args.images, args.size)
        raw = {
            "data_root": str(root), "classes": [{"name": "a", "prompts": ["x"]}, {"name": "b", "prompts": ["y"]}],
            "preprocess": {"width": 64, "height": 64, "aspect": "stretch", "resample": "bicubic", "shard_size": 1000},
        }  # fmt: skip
        (root / "c.toml").write_text(tomli_w.dumps(raw))
        results = {
            "(c) decode only (floor)": run("decode", str(root)),
            "(a) naive loop": run("naive", str(root)),
            "(b) synthflux, 1 worker": run("synthflux", str(root), str(root / "c.toml"), "1"),
            f"(b) synthflux, {cores} workers": run(
                "synthflux", str(root), str(root / "c.toml"), str(cores)
            ),
        }
    n = args.images
    print(f"{n} PNGs {args.size}x{args.size} RGB -> 64x64 grayscale float32, {cores} cores")
    for name, r in results.items():
        print(
            f"  {name:28s} {n / r['s']:9.1f} img/s  {r['s']:7.2f} s  peak RSS {r['rss'] / 1024:7.1f} MiB"
        )
    t = {
        k.split(")")[0] + ")" + (" all" if "workers" in k and "1 worker" not in k else ""): v["s"]
        for k, v in results.items()
    }
    naive, floor = results["(a) naive loop"]["s"], results["(c) decode only (floor)"]["s"]
    one = results["(b) synthflux, 1 worker"]["s"]
    allc = results[f"(b) synthflux, {cores} workers"]["s"]
    print(f"speed-up (b, {cores} workers) vs (a): {naive / allc:.2f}x   (target >= 3)")
    print(f"time (b, 1 worker) / (c) decode floor: {one / floor:.2f}   (target <= 1.3)")
    del t

    # Memory: the same stage on a small and a 20x larger set of small images.
    rss = {}
    for count in (args.memory_images // 20, args.memory_images):
        with tempfile.TemporaryDirectory(prefix="synthflux-bench-") as tmp:
            root = Path(tmp)
            make_pngs(root, count, 32)
            raw["data_root"] = str(root)
            raw["preprocess"]["shard_size"] = 1000
            (root / "c.toml").write_text(tomli_w.dumps(raw))
            rss[count] = run("synthflux", str(root), str(root / "c.toml"), "1")["rss"]
    small, large = sorted(rss)
    print(f"peak RSS, 1 worker: {small} images {rss[small] / 1024:.1f} MiB, {large} images "
          f"{rss[large] / 1024:.1f} MiB, ratio {rss[large] / rss[small]:.3f} (target <= 1.2)")  # fmt: skip


if __name__ == "__main__":
    main()
