"""The filter stage: near-duplicates, a CNN trained on real images, keep-top-k; what preprocess
then reads; and when it is current."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
from digits import CLASSES, digits_config, write_digits
from PIL import Image

from conftest import mark_generated, run_cli, save_config
from synthflux import filter as filtering
from synthflux import generate, ingest, lineage, preprocess, status
from synthflux.errors import DataError
from synthflux.filter import Scored
from synthflux.layout import DataLayout
from synthflux.storage import sha256_file


def scores(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.layout.filter_scores.read_text().splitlines()]


def test_near_duplicates_are_dropped_and_name_the_image_they_repeat(tmp_path):
    layout = DataLayout(tmp_path)
    rng = np.random.default_rng(0)
    base = (rng.random((64, 64)) * 255).astype(np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    other = (rng.random((64, 64)) * 255).astype(np.uint8)
    images = {"a-0": base, "a-1": other, "a-2": noisy, "a-3": base, "b-0": base}
    items = []
    for index, (name, pixels) in enumerate(images.items()):
        cls = name[0]
        (tmp_path / "generated" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "generated" / cls / f"{name}.png")
        items.append(Scored({"id": index, "name": name, "class": cls, "label": 0, "index": index,
                             "file": f"{cls}/{name}.png"}))  # fmt: skip
    filtering._drop_duplicates(items, layout, max_distance=6)
    dropped = {i.record["name"]: i.dropped for i in items}
    assert dropped["a-0"] is None and dropped["a-1"] is None
    assert dropped["a-2"].startswith("near-duplicate") and "from a-0" in dropped["a-2"]
    assert dropped["a-3"] == "near-duplicate: 0 bits from a-0"
    assert dropped["b-0"] is None  # duplicates are looked for within a class only
    assert all(len(i.scores["phash"]) == 16 for i in items)  # 64 bits, recorded per image


def test_filter_sits_between_generate_and_preprocess(write_config):
    """The kept images are what preprocess reads; a changed rule is a stale filter."""
    path, cfg = write_config(filter={"max_hash_distance": 64})  # everything repeats the first
    generate.run(cfg)
    summary = filtering.run(cfg)
    assert summary.kept == {"cat": 1, "dog": 1} and summary.dropped == {"near-duplicate": 6}
    assert len(scores(cfg)) == 8 and lineage.is_current(cfg, "filter")
    preprocess.run(cfg)
    dataset = json.loads(cfg.layout.prepared("synthetic").dataset.read_text())
    assert dataset["counts"] == {"cat": 1, "dog": 1}
    kept = [json.loads(line) for line in cfg.layout.filtered_manifest.read_text().splitlines()]
    assert [r["index"] for r in kept] == [0, 0] and "phash" in kept[0]["filter"]
    # A new rule: the filter is stale, and the stages after it wait for it.
    _, looser = save_config(path, {**_raw(path), "filter": {"max_hash_distance": 0}})
    states = status.pipeline_status(looser, 1).stages
    assert states["generate"].complete and not states["filter"].complete
    assert states["preprocess"].waiting
    assert filtering.run(looser).kept == {"cat": 4, "dog": 4}
    preprocess.run(looser)
    dataset = json.loads(looser.layout.prepared("synthetic").dataset.read_text())
    assert dataset["counts"] == {"cat": 4, "dog": 4}


def _raw(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_real_cnn_scores_need_real_training_images(write_config):
    path, cfg = write_config(filter={"min_real_confidence": 0.5})
    generate.run(cfg)
    with pytest.raises(DataError, match="none were imported for training"):
        filtering.run(cfg)
    result = run_cli("filter", str(path))
    assert result.returncode == 2 and "import CONFIG FOLDER --as train" in result.stderr


@pytest.mark.slow
def test_a_cnn_trained_on_real_digits_drops_mislabelled_synthetic_ones(tmp_path):
    """Stand-in "synthetic" images: held-out real digits, a third of them under a wrong class.
    The CNN trained on the real training digits must drop those and keep the others."""
    train, test = write_digits(tmp_path / "digits")
    raw = digits_config(tmp_path / "data", epochs=8, sources=["synthetic"])
    raw["classes"] = [{"name": c, "prompts": [f"the digit {c}"]} for c in CLASSES]
    raw["filter"] = {"min_real_confidence": 0.3}
    _, cfg = save_config(tmp_path / "digits.toml", raw)
    ingest.run(cfg, train, split="train")
    records, wrong = _fake_generated(cfg, test)
    summary = filtering.run(cfg)
    rows = {r["id"]: r for r in scores(cfg)}
    dropped_wrong = sum(rows[i]["dropped"] is not None for i in wrong)
    kept_right = sum(rows[r["id"]]["dropped"] is None for r in records if r["id"] not in wrong)
    assert dropped_wrong / len(wrong) >= 0.85, (dropped_wrong, len(wrong))
    assert kept_right / (len(records) - len(wrong)) >= 0.85, kept_right
    assert summary.dropped["low real confidence"] >= dropped_wrong
    assert all(0 <= r["scores"]["real_confidence"] <= 1 for r in rows.values())
    # keep_top: the best k per class, by that confidence, of the same CNN (not trained again)
    weights = cfg.layout.filter_cnn / "run" / "weights.npz"
    trained = weights.stat().st_mtime_ns
    raw["filter"] = {"keep_top": 5}
    _, top = save_config(tmp_path / "top.toml", raw)
    assert filtering.run(top).kept == dict.fromkeys(CLASSES, 5)
    assert weights.stat().st_mtime_ns == trained
    for name in CLASSES:
        ranked = sorted((r for r in scores(top) if r["class"] == name),
                        key=lambda r: -r["scores"]["real_confidence"])  # fmt: skip
        assert all(r["dropped"] is None for r in ranked[:5])
        assert all(r["dropped"].startswith("not in the top k") for r in ranked[5:])
    # a changed training setting is a new CNN
    raw["train"]["epochs"] = 1
    _, fewer = save_config(tmp_path / "fewer.toml", raw)
    filtering.run(fewer)
    assert weights.stat().st_mtime_ns != trained


def _fake_generated(cfg, folder: Path) -> tuple[list[dict], set[int]]:
    """`folder`'s digits written as generate's output, every third one under the next class."""
    records, wrong, counts = [], set(), dict.fromkeys(CLASSES, 0)
    for n, png in enumerate(sorted(folder.glob("*/*.png"))):
        true = png.parent.name
        cls = CLASSES[(int(true) + 1) % 10] if n % 3 == 0 else true
        index, counts[cls] = counts[cls], counts[cls] + 1
        label = CLASSES.index(cls)
        file = f"{cls}/{cls}-{index:06d}.png"
        dest = cfg.layout.image(file)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, dest)
        image_id = label * 1_000_000 + index
        records.append({"id": image_id, "name": f"{cls}-{index:06d}", "class": cls,
                        "label": label, "index": index, "file": file, "status": "ok",
                        "sha256": sha256_file(dest)})  # fmt: skip
        if n % 3 == 0:
            wrong.add(image_id)
    cfg.layout.manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    mark_generated(cfg)
    return records, wrong


def test_run_filters_and_the_report_says_what_was_dropped(write_config):
    from synthflux.pipeline import run_pipeline

    _, cfg = write_config(filter={"max_hash_distance": 64}, cnn={"backend": "reference"},
                          train={"epochs": 1})  # fmt: skip
    said: list[str] = []
    run_pipeline(cfg, say=said.append)
    assert (
        "filter: kept 2 images (per class {'cat': 1, 'dog': 1}); dropped: 6 near-duplicate" in said
    )
    page = (cfg.layout.report / "index.html").read_text()
    assert "<h2>Filter</h2><p>Generated images dropped before training: 6 near-duplicate" in page


def test_clip_scores_are_clipscore_and_zero_shot_confidence(write_config):
    """The scores equal CLIP's own numbers, computed here independently; the bars drop exactly
    the images below them."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    path, cfg = write_config(filter={"clip_model": "tiny"})
    generate.run(cfg)
    filtering.run(cfg)
    rows = scores(cfg)
    model = CLIPModel.from_pretrained(cfg.layout.tiny_clip)
    processor = CLIPProcessor.from_pretrained(cfg.layout.tiny_clip)
    records = {
        r["id"]: r
        for r in (json.loads(line) for line in cfg.layout.manifest.read_text().splitlines())
    }
    texts = ["a photo of a cat", "a photo of a dog"]
    for row in rows:
        rec = records[row["id"]]
        image = Image.open(cfg.layout.image(rec["file"])).convert("RGB")
        with torch.no_grad():
            out = model(**processor(text=[rec["model_prompt"], *texts], images=[image],
                                    return_tensors="pt", padding=True))  # fmt: skip
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds[:1])
        assert row["scores"]["clip_score"] == pytest.approx(max(100 * float(cosine), 0), abs=1e-3)
        zero_shot = out.logits_per_image[0, 1:].softmax(-1)[["cat", "dog"].index(rec["class"])]
        assert row["scores"]["clip_confidence"] == pytest.approx(float(zero_shot), abs=1e-5)
    # (a random CLIP's cosines are often negative, so its scores are often 0: the zero-shot
    # probability makes the bar here)
    bar = float(np.median([r["scores"]["clip_confidence"] for r in rows]))
    rule = {"clip_model": "tiny", "min_clip_confidence": bar}
    # (real images train too: a class the bar empties is then said, not an error)
    mixed = {**_raw(path).get("train", {}), "sources": ["synthetic", "real"]}
    _, strict = save_config(path, {**_raw(path), "filter": rule, "train": mixed})
    assert not lineage.is_current(strict, "filter")
    filtering.run(strict)
    dropped = [(r["dropped"] or "").startswith("low CLIP confidence") for r in scores(strict)]
    assert dropped == [r["scores"]["clip_confidence"] < bar for r in rows] and 0 < sum(dropped) < 8


def test_a_filter_that_keeps_nothing_says_which_setting(write_config, tmp_path):
    """Every image dropped: one line naming the settings, not preprocess's "no shards"."""
    path, cfg = write_config(filter={"keep_top": 1, "max_hash_distance": 64})
    generate.run(cfg)
    # keep_top without real images ranks by index (README), never refuses for want of them
    result = run_cli("filter", str(path))
    assert result.returncode == 0, result.stderr
    assert filtering.run(cfg).kept == {"cat": 1, "dog": 1}
    _, none = write_config(data=tmp_path / "none", name="none.toml",
                           filter={"max_hash_distance": 64, "clip_model": "tiny", "min_clip_score": 100})  # fmt: skip
    generate.run(none)
    with pytest.raises(DataError) as e:
        filtering.run(none)
    said = str(e.value)
    assert "the filter did not keep any generated image" in said
    assert "(filter.min_clip_score = 100.0)" in said and "\n" not in said
    assert not none.layout.filtered_manifest.exists() and none.layout.filter_scores.is_file()
    assert not lineage.is_current(none, "filter")


def test_a_filter_that_empties_a_class_is_an_error_before_training(write_config):
    """CLIP's zero-shot bar set between the two classes' best scores: one class keeps some
    images, the other none -- an error naming that class, not a CNN that learns one class."""
    _, cfg = write_config(filter={"clip_model": "tiny"})
    generate.run(cfg)
    scored = filtering.run(cfg)
    assert sum(scored.kept.values()) == 8
    confidences = {r["class"]: [] for r in scores(cfg)}
    for r in scores(cfg):
        confidences[r["class"]].append(r["scores"]["clip_confidence"])
    # a bar between the classes: one class keeps some, the other none
    low, high = sorted(confidences, key=lambda c: max(confidences[c]))
    bar = (max(confidences[low]) + min(max(confidences[high]), 1.0)) / 2
    assert max(confidences[low]) < bar <= max(confidences[high])
    _, one = write_config(
        name="one.toml", filter={"clip_model": "tiny", "min_clip_confidence": bar}
    )
    with pytest.raises(DataError, match=f"did not keep any image of class '{low}'"):
        filtering.run(one)
    assert not lineage.is_current(one, "filter")  # nothing published: training cannot start


def test_altered_images_are_refused_until_generate_makes_them_again(write_config):
    """Scores of an altered file would stay current once generate repaired it (the manifest,
    the filter's key, comes back the same): the filter checks every image's bytes first."""
    _, cfg = write_config(filter={"max_hash_distance": 2})
    generate.run(cfg)
    first, second = sorted(cfg.layout.generated.glob("cat/*.png"))[:2]
    shutil.copy(first, second)  # a copy: it would be dropped as a near-duplicate of the first
    with pytest.raises(DataError, match=r"1 generated image not as generate made them \(first: "):
        filtering.run(cfg)
    assert not cfg.layout.filtered_manifest.exists()
    assert generate.run(cfg).generated > 0
    filtering.run(cfg)
    assert not any("0 bits from" in (r["dropped"] or "") for r in scores(cfg))
