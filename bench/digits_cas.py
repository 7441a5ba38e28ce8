"""Do synthetic digits teach? The classification accuracy score (CAS: train on synthetic
images only, test on real ones; Ravuri & Vinyals 2019) of the pixel generator fitted to
scikit-learn's digits, next to the same CNN trained on the real images alone and on real +
synthetic, and the fit's wall time -- for the whole real training half and for a small one.

Everything runs through synthflux itself (examples/digits.toml: finetune, generate,
preprocess, train, classify, evaluate with the PyTorch twin), one data root per real-set size.

    python bench/digits_cas.py            # ~15 min on 2 cores: all ~90 real per class, and 20
    python bench/digits_cas.py --quick    # a smoke run (~1 min): a short fit, few images
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from synthflux import ingest
from synthflux.config import load_config, read_toml
from synthflux.digits import write_digits
from synthflux.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def subset(train: Path, per_class: int, dest: Path) -> Path:
    """The first `per_class` images of each class of an ImageFolder, copied."""
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy2(png, dest / folder.name / png.name)
    return dest


def accuracies(root: Path, raw: dict[str, Any], sources: list[str]) -> dict[str, Any]:
    """One `synthflux run` training on `sources`: its test accuracy and the real-only baseline."""
    raw = {**raw, "train": {**raw["train"], "sources": sources}}
    path = root / f"{'-'.join(sources)}.toml"
    path.write_text(tomli_w.dumps(raw))
    run_pipeline(load_config(path), say=lambda line: None)
    summary = json.loads((root / "evaluation" / "summary.json").read_text())
    base = (summary.get("baseline") or {}).get("tests", {}).get("test", {})
    return {"test": summary["splits"]["test"]["accuracy"], "baseline": base.get("accuracy")}


def measure(
    work: Path, raw: dict[str, Any], train: Path, test: Path, per_class: int | None
) -> dict[str, Any]:
    root = work / f"real-{per_class or 'all'}"
    raw = {**raw, "data_root": str(root)}
    if per_class:
        train = subset(train, per_class, work / f"train-{per_class}")
    root.mkdir(parents=True)
    (root / "import.toml").write_text(tomli_w.dumps(raw))
    cfg = load_config(root / "import.toml")
    real = ingest.run(cfg, train, split="train").images
    ingest.run(cfg, test, split="test")
    start = time.perf_counter()
    synthetic = accuracies(root, raw, ["synthetic"])
    total = time.perf_counter() - start
    fit = json.loads((root / "finetuned" / "stage.json").read_text())["seconds"]
    both = accuracies(root, raw, ["synthetic", "real"])
    return {"real_per_class": real / len(raw["classes"]), "fit_s": fit, "run_s": total,
            "cas": synthetic["test"], "real_only": synthetic["baseline"], "both": both["test"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 30 fit steps, 10 images a class"
    )
    parser.add_argument("--fit-steps", type=int, help="finetune.steps (default: the example's)")
    parser.add_argument(
        "--images", type=int, help="synthetic images per class (default: the example's)"
    )
    parser.add_argument(
        "--small", type=int, default=20, help="the small real set's images per class"
    )
    args = parser.parse_args()
    raw = read_toml(REPO / "examples" / "digits.toml")
    if args.quick:
        raw["finetune"]["steps"], raw["images_per_class"], raw["train"]["epochs"] = 30, 10, 3
    raw["finetune"]["steps"] = args.fit_steps or raw["finetune"]["steps"]
    raw["images_per_class"] = args.images or raw["images_per_class"]
    work = Path(tempfile.mkdtemp(prefix="synthflux-cas-"))
    try:
        train, test = write_digits(work / "digits", test_fraction=0.5)
        rows = [measure(work, raw, train, test, n) for n in (None, args.small)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"scikit-learn digits, 16x16: the pixel generator fitted for {raw['finetune']['steps']} "
          f"steps, {raw['images_per_class']} synthetic images per class, the CNN of "
          "examples/digits.toml; accuracy on the real test half (898 images)")  # fmt: skip
    print(f"{'real/class':>10} {'fit s':>7} {'synthetic only (CAS)':>21} {'real only':>10} "
          f"{'real+synthetic':>15} {'CAS/real':>9} {'both/real':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['real_per_class']:>10.1f} {r['fit_s']:>7.0f} {r['cas']:>21.3f} {r['real_only']:>10.3f} "
              f"{r['both']:>15.3f} {r['cas'] / r['real_only']:>9.3f} {r['both'] / r['real_only']:>10.3f}")  # fmt: skip
    print(
        "goals: CAS >= 0.92 with the fit <= 300 s (all real images); real+synthetic >= real "
        f"only with {args.small} real per class (both/real >= 1)"
    )


if __name__ == "__main__":
    main()
