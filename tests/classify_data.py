"""Small on-disk fixtures for the classify tests: what generate and preprocess would leave.

The files follow docs/architecture.md's contracts (manifest.jsonl, shard-NNNNN.npz with
Fortran-order (W, H, C, N) float32 images, dataset.json) but are written directly with
numpy/json, so the classify tests need neither Stable Diffusion nor the preprocess stage.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conftest import mark_generated, mark_preprocessed, save_config
from synthflux.config import PipelineConfig
from synthflux.weights import init_weights, save_weights

STANDIN = Path(__file__).resolve().parent / "standin" / "flux_model_standin.py"


@dataclass(frozen=True)
class Fixture:
    root: Path
    classes: list[str]
    ids: np.ndarray  # every image id, in shard order
    labels: np.ndarray
    shard_files: list[str]
    records: dict[int, dict[str, Any]]  # generation manifest by id


def make_data(
    root: Path,
    *,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 5,
    shard_size: int = 3,
    size: int = 8,
    channels: int = 1,
    seed: int = 0,
) -> Fixture:
    """DATA/generated/manifest.jsonl and DATA/preprocessed/synthetic/{shards, dataset.json,
    manifest}: what generate and preprocess would leave for the synthetic source."""
    rng = np.random.default_rng(seed)
    gen, prep = root / "generated", root / "preprocessed" / "synthetic"
    gen.mkdir(parents=True)
    prep.mkdir(parents=True)
    records = {}
    for label, name in enumerate(classes):
        for index in range(per_class):
            image_id = len(records)
            records[image_id] = {
                "id": image_id,
                "name": f"{name}-{index:06d}",
                "class": name,
                "label": label,
                "index": index,
                "prompt": f"a photo of a {name}, number {index}",
                "negative_prompt": "blurry",
                "seed": int(rng.integers(2**62)),
                "file": f"{name}/{name}-{index:06d}.png",
                "sha256": "0" * 64,
                "model": "tiny",
                "status": "ok",
            }
    with open(gen / "manifest.jsonl", "w") as f:
        for rec in records.values():
            f.write(json.dumps(rec) + "\n")

    ids = np.array(sorted(records), dtype=np.int64)
    labels = np.array([records[i]["label"] for i in ids], dtype=np.int64)
    shards, prep_manifest = [], []
    for start in range(0, len(ids), shard_size):
        part = slice(start, start + shard_size)
        n = len(ids[part])
        file = f"shard-{len(shards):05d}.npz"
        images = np.asfortranarray(rng.normal(size=(size, size, channels, n)).astype(np.float32))
        np.savez(prep / file, images=images, labels=labels[part], ids=ids[part])
        shards.append({"file": file, "count": n, "sha256": "0" * 64})
        for row, image_id in enumerate(ids[part].tolist()):
            rec = records[image_id]
            prep_manifest.append(
                {
                    "id": image_id,
                    "shard": file,
                    "row": row,
                    "label": rec["label"],
                    "class": rec["class"],
                }
            )
    dataset = {
        "source": "synthetic",
        "split": "train",
        "layout": "WHCN",
        "width": size,
        "height": size,
        "channels": channels,
        "normalization": {"mean": [0.5] * channels, "std": [0.5] * channels},
        "classes": list(classes),
        "counts": {c: per_class for c in classes},
        "shards": shards,
    }
    (prep / "dataset.json").write_text(json.dumps(dataset))
    (prep / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prep_manifest))
    return Fixture(root, list(classes), ids, labels, [s["file"] for s in shards], records)


def write_config(
    folder: Path, data_root: Path, classes: list[str], **settings: Any
) -> tuple[Path, PipelineConfig]:
    """`settings`: [cnn] keys (backend, image, julia, ...), and `weights` for [classify]."""
    classify = {"weights": settings.pop("weights")} if "weights" in settings else {}
    raw = {
        "data_root": str(data_root),
        "seed": 3,
        "classes": [{"name": c, "prompts": [f"a photo of a {c}"]} for c in classes],
        "classify": classify,
        "cnn": {"batch_size": 4, "memory": "512m", "cpus": 1.0, **settings},
    }
    path, cfg = save_config(folder / "pipeline.toml", raw)
    mark_generated(cfg, seconds=12.5)  # what generate and preprocess would have recorded
    mark_preprocessed(cfg, seconds=3.25)
    weights = data_root / "model" / "weights.npz"  # as train would leave them
    if not weights.exists():
        info = json.loads((data_root / "preprocessed" / "synthetic" / "dataset.json").read_text())
        shape = info["width"], info["height"], info["channels"], len(classes)
        save_weights(weights, init_weights(*shape, seed=3))
    return path, cfg


def control_standin(fx: Fixture, **ctl: Any) -> None:
    """Make the stand-in misbehave: it reads standin-control.json in its input folder."""
    (fx.root / "preprocessed" / "synthetic" / "standin-control.json").write_text(json.dumps(ctl))


def release_standin(fx: Fixture) -> None:
    """Let a stand-in started with hold=True go on."""
    (fx.root / "preprocessed" / "synthetic" / "standin-release").touch()


def fake_julia(folder: Path) -> tuple[Path, Path]:
    """A `julia` executable running the stand-in, and a julia/ folder with flux_model.jl.

    The driver calls `<julia> --project=<dir> <dir>/flux_model.jl ARGS`; the stand-in skips the
    first two, exactly as in the test image. Each start is logged: `julia_starts(folder)`.
    """
    exe = folder / "julia"
    log = folder / "julia-starts.log"
    exe.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    exe.chmod(0o755)
    jdir = folder / "julia-project"
    jdir.mkdir()
    (jdir / "flux_model.jl").write_text("# placeholder: the stand-in ignores this path\n")
    return exe, jdir


def julia_starts(folder: Path) -> list[str]:
    """The command lines `fake_julia(folder)`'s julia was started with, one per start."""
    log = folder / "julia-starts.log"
    return log.read_text().splitlines() if log.is_file() else []


def check_success(fx: Fixture, summary: Any) -> None:
    """Everything a successful run leaves, checked against the inputs computed here."""
    out = fx.root / "predictions"
    probs_dir = out / "synthetic"
    probs_by_shard = []
    for file in fx.shard_files:
        with np.load(probs_dir / file.replace(".npz", ".probs.npz"), allow_pickle=False) as z:
            with np.load(fx.root / "preprocessed" / "synthetic" / file) as shard:
                np.testing.assert_array_equal(z["ids"], shard["ids"])
            probs_by_shard.append(z["probs"])
    probs = np.concatenate(probs_by_shard)
    assert probs.shape == (len(fx.ids), len(fx.classes))
    predicted = probs.argmax(axis=1)
    accuracy = float(np.mean(predicted == fx.labels))
    # The stand-in's fake probabilities must not make every answer right or wrong, or
    # a swapped label/prediction column would go unnoticed.
    assert 0 < accuracy < 1

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == fx.ids.tolist()
    assert [int(r["label"]) for r in rows] == fx.labels.tolist()
    for row, p, pred in zip(rows, probs, predicted, strict=True):
        rec = fx.records[int(row["id"])]
        assert row["class"] == rec["class"] and row["name"] == rec["name"]
        assert row["prompt"] == rec["prompt"] and int(row["seed"]) == rec["seed"]
        assert row["file"] == rec["file"]
        got = [float(row[f"p_{c}"]) for c in fx.classes]
        np.testing.assert_allclose(got, p, atol=1e-6)
        assert row["predicted"] == fx.classes[pred]

    summary_json = json.loads((out / "summary.json").read_text())
    assert summary_json["images"] == len(fx.ids)
    assert summary_json["shards"] == len(fx.shard_files)
    assert summary_json["accuracy"] == accuracy
    assert summary_json["correct"] == int((predicted == fx.labels).sum())
    k = len(fx.classes)
    confusion = np.zeros((k, k), dtype=int)
    for t, p in zip(fx.labels, predicted, strict=True):
        confusion[t, p] += 1
    assert summary_json["confusion_matrix"]["matrix"] == confusion.tolist()
    assert summary_json["counts"] == {
        c: int((fx.labels == i).sum()) for i, c in enumerate(fx.classes)
    }
    for i, c in enumerate(fx.classes):
        mean = probs[fx.labels == i].mean(axis=0)
        got = [summary_json["mean_probabilities"][c][d] for d in fx.classes]
        np.testing.assert_allclose(got, mean, rtol=1e-6)
    timings = summary_json["timings"]
    assert timings["generate"]["seconds"] == 12.5 and timings["preprocess"]["seconds"] == 3.25
    assert timings["classify"]["seconds"] > 0

    stage = json.loads((out / "stage.json").read_text())
    assert stage["stage"] == "classify" and stage["images"] == len(fx.ids)
    assert summary.accuracy == accuracy
    text = "\n".join(summary.lines())
    assert f"{summary_json['correct']}/{len(fx.ids)}" in text
    # Only the published outputs remain: no staging folder, no temp file.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
