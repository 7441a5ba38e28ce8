"""The real-only baseline: what the same CNN learns from the real training images alone.

When the CNN is trained without real images (`[train] sources` has no "real") and real ones
were imported for training, evaluate also trains [train]'s network on those (their
preprocessed shards, [train]'s settings and initial weights, the PyTorch twin, which follows
the Julia trainer's rules) and scores it on every test set: the number the synthetic-trained
CNN's test accuracy is to be read against (`[train] baseline = false` leaves it out).
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from synthflux.config import PipelineConfig
from synthflux.contracts import load_dataset, read_shard
from synthflux.progress import plural
from synthflux.sources import Source, imported, test_sources
from synthflux.storage import sha256_file
from synthflux.trainplan import TrainSettings

log = logging.getLogger("synthflux")


def real_training(cfg: PipelineConfig) -> list[Source]:
    """The imported training sources the baseline learns from; none: no baseline."""
    if not cfg.train.baseline or "real" in cfg.train.sources or not test_sources(cfg):
        return []
    return [s for s in imported(cfg.layout) if s.split == "train"]


def inputs(cfg: PipelineConfig) -> dict[str, str]:
    """What the baseline is computed from (for evaluate's key): each real training source's
    and test set's dataset.json (which lists its shards' sha256)."""
    sources = real_training(cfg)
    if not sources:
        return {}
    named = [s.name for s in sources] + [s.name for s in test_sources(cfg)]
    return {name: sha256_file(cfg.layout.prepared(name).dataset) for name in named}


def run(cfg: PipelineConfig) -> dict[str, Any] | None:
    """Train the baseline afresh and score it on every test set; None when there is none."""
    from synthflux import reference
    from synthflux.reference_train import train
    from synthflux.weights import init_weights, load_weights, save_weights

    sources = real_training(cfg)
    if not sources:
        return None
    layout, pre, t = cfg.layout, cfg.preprocess, cfg.train
    folder = layout.baseline
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_weights(folder / "init.npz", init_weights(pre.width, pre.height, pre.channels,
                 len(cfg.class_names), t.seed, t.blocks, t.kernel))  # fmt: skip
    images = sum(int(load_dataset(cfg, s.name).images) for s in sources)
    log.info("evaluate: training the real-only baseline on %s", plural(images, "real image"))
    train([(s.name, layout.prepared(s.name).folder) for s in sources], folder / "init.npz",
          folder / "run", TrainSettings.of(t), lambda line: log.debug("baseline: %s", line))  # fmt: skip
    weights = dict(load_weights(folder / "run" / "weights.npz"))
    model = reference.build_model(weights)
    tests = {}
    for test in test_sources(cfg):
        correct = total = 0
        for shard in load_dataset(cfg, test.name).shards:
            pixels, labels, _ = read_shard(shard.path)
            predicted = reference.predict(weights, pixels, model=model).argmax(axis=1)
            correct += int((predicted == labels).sum())
            total += len(labels)
        tests[test.name] = {"accuracy": correct / total if total else None,
                            "correct": correct, "images": total}  # fmt: skip
    return {"trained_on": [s.name for s in sources], "images": images, "tests": tests,
            "note": "the same CNN, trained by [train]'s settings on the real training images "
            "alone (PyTorch twin)"}  # fmt: skip


def lines(found: dict[str, Any] | None) -> list[str]:
    if not found:
        return []
    return [f"real-only baseline ({', '.join(found['trained_on'])}; "
            f"{plural(found['images'], 'image')}): {name} accuracy "
            + ("n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}")
            + f" ({s['correct']}/{s['images']})" for name, s in found["tests"].items()]  # fmt: skip
