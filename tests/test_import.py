"""`synthflux import`: a folder of real images as a training or test source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, save_config
from synthflux import ingest, preprocess
from synthflux.errors import DataError
from synthflux.trainplan import validation_mask

CLASSES = ["cat", "dog"]


def folder_of(root: Path, per_class: dict[str, int], start: int = 0) -> Path:
    """root/<class>/<sub>/img-N.png (a level deeper for half of them) of random pixels."""
    rng = np.random.default_rng(start)
    for c, n in per_class.items():
        for i in range(start, start + n):
            sub = root / c / ("deeper" if i % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"img-{i:03d}.png")
    return root


def config(tmp_path: Path, **train: object):
    raw = {"data_root": str(tmp_path / "data"), "classes": [{"name": c} for c in CLASSES],
           "preprocess": {"width": 8, "height": 8, "shard_size": 4},
           "train": {"sources": ["real"], **train}}  # fmt: skip
    return save_config(tmp_path / "real.toml", raw)


def manifest(cfg, name: str) -> list[dict]:
    lines = (cfg.data_root / "imported" / name / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_folder_becomes_a_source_of_the_same_schema(tmp_path):
    folder = folder_of(tmp_path / "photos", {"cat": 3, "dog": 2})
    (folder / "cat" / "notes.txt").write_text("not an image")
    path, cfg = config(tmp_path)
    done = run_cli("import", str(path), str(folder), "--as", "train")
    assert done.returncode == 0, done.stderr
    assert "5 images (5 new or changed" in done.stdout and "ignored 1 file" in done.stdout
    records = manifest(cfg, "train")
    assert [r["class"] for r in records] == ["cat"] * 3 + ["dog"] * 2
    for r in records:
        copy = cfg.data_root / "imported" / "train" / r["file"]
        original = Path(r["original"])
        assert copy.read_bytes() == original.read_bytes() and r["source"] == "real"
        assert r["label"] == CLASSES.index(r["class"]) and r["status"] == "ok"
    assert any("deeper/" in r["file"] for r in records)  # any depth below the class folder
    summary = preprocess.run(cfg)
    assert summary.complete and summary.processed["train"] == {"cat": 3, "dog": 2}


def test_reimport_does_nothing_unless_the_folder_changed(tmp_path):
    folder = folder_of(tmp_path / "photos", {"cat": 3, "dog": 3})
    _, cfg = config(tmp_path)
    ingest.run(cfg, folder, split="train")
    manifest_path = cfg.data_root / "imported" / "train" / "manifest.jsonl"
    before = manifest_path.read_bytes()
    again = ingest.run(cfg, folder, split="train")
    assert (again.copied, again.unchanged, again.removed) == (0, 6, 0)
    assert manifest_path.read_bytes() == before
    # A changed file is read again, a removed one removed, a new one added.
    changed = next((folder / "cat").glob("img-*.png"))
    Image.new("RGB", (9, 9), (1, 2, 3)).save(changed)
    removed = next((folder / "dog").glob("img-*.png"))
    removed.unlink()
    folder_of(folder, {"dog": 1}, start=50)
    third = ingest.run(cfg, folder, split="train")
    assert (third.copied, third.unchanged, third.removed) == (2, 4, 1)
    records = {r["original"]: r for r in manifest(cfg, "train")}
    assert str(removed.resolve()) not in records
    copy = cfg.data_root / "imported" / "train" / records[str(changed.resolve())]["file"]
    assert copy.read_bytes() == changed.read_bytes()


def test_adding_images_never_moves_one_between_splits(tmp_path):
    folder = folder_of(tmp_path / "photos", {"cat": 20, "dog": 20})
    _, cfg = config(tmp_path, val_fraction=0.3)
    ingest.run(cfg, folder, split="train")
    ids = np.array([r["id"] for r in manifest(cfg, "train")])
    before = dict(zip(ids.tolist(), validation_mask(0, "train", ids, 0.3).tolist(), strict=True))
    assert 0 < sum(before.values()) < len(before)
    folder_of(folder, {"cat": 15, "dog": 15}, start=100)
    ingest.run(cfg, folder, split="train")
    grown = np.array([r["id"] for r in manifest(cfg, "train")])
    after = dict(zip(grown.tolist(), validation_mask(0, "train", grown, 0.3).tolist(), strict=True))
    assert len(after) == 70 and all(after[i] == held for i, held in before.items())


@pytest.mark.parametrize(
    ("folders", "options", "message"),
    [
        ({"cat": 1, "dog": 1, "fox": 1}, [], "not classes: ['fox']"),
        ({"cat": 1}, [], "no folder: ['dog'] (or import with --classes-subset)"),
        ({}, [], "do not match the config's classes"),
    ],
)
def test_folders_that_do_not_match_the_classes(tmp_path, folders, options, message):
    folder = folder_of(tmp_path / "photos", folders)
    folder.mkdir(exist_ok=True)
    path, cfg = config(tmp_path)
    done = run_cli("import", str(path), str(folder), "--as", "test", *options)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr and "['cat', 'dog']" in done.stderr
    assert not (cfg.data_root / "imported").exists()


def test_a_subset_of_classes_and_other_errors(tmp_path):
    _, cfg = config(tmp_path)
    folder = folder_of(tmp_path / "cats", {"cat": 2})
    assert ingest.run(cfg, folder, split="test", classes_subset=True).images == 2
    with pytest.raises(DataError, match="no such folder"):
        ingest.run(cfg, tmp_path / "nowhere", split="train")
    with pytest.raises(DataError, match="was imported --as test"):
        ingest.run(cfg, folder_of(tmp_path / "more", {"cat": 1, "dog": 1}), split="train",
                   name="test")  # fmt: skip
    with pytest.raises(DataError, match="'synthetic'"):
        ingest.run(cfg, folder, split="train", name="synthetic", classes_subset=True)
    empty = tmp_path / "empty"
    for c in CLASSES:
        (empty / c).mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ingest.run(cfg, empty, split="train")


def test_bad_files_are_quarantined_by_preprocess(tmp_path):
    folder = folder_of(tmp_path / "photos", {"cat": 2, "dog": 2})
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    _, cfg = config(tmp_path)
    ingest.run(cfg, folder, split="train")
    summary = preprocess.run(cfg)
    assert summary.complete and summary.rejected["train"] == {"cat": 1, "dog": 1}
    lines = (cfg.data_root / "preprocessed" / "train" / "rejects.jsonl").read_text().splitlines()
    reasons = {json.loads(line)["file"]: json.loads(line)["reason"] for line in lines}
    assert reasons["dog/empty.jpg"].startswith("empty file")
    assert reasons["cat/broken.png"].startswith(("not an image", "cannot decode"))


def test_a_damaged_import_record_is_a_clear_error_on_reimport(tmp_path):
    folder = folder_of(tmp_path / "photos", {"cat": 2, "dog": 2})
    path, cfg = config(tmp_path)
    assert run_cli("import", str(path), str(folder), "--as", "train").returncode == 0
    source = cfg.data_root / "imported" / "train"
    for damaged, text in (("manifest.jsonl", '{"id": 1\n'), ("source.json", "[1, 2]")):
        kept = (source / damaged).read_bytes()
        (source / damaged).write_text(text)
        done = run_cli("import", str(path), str(folder), "--as", "train")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{source / damaged}" in done.stderr, done.stderr
        (source / damaged).write_bytes(kept)


def test_names_that_are_not_utf8_and_links_are_listed_not_fatal(tmp_path):
    """A Latin-1 file name (bytes no text encoding reads back), a broken link and a link to a
    folder: each listed with its reason; the other images import and preprocess."""
    import os

    folder = folder_of(tmp_path / "photos", {"cat": 2, "dog": 2})
    latin1 = os.fsencode(folder / "cat") + b"/caf\xe9.png"
    Image.new("L", (8, 8), 90).save(latin1)
    (folder / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "dog" / "elsewhere").symlink_to(folder / "cat", target_is_directory=True)
    path, cfg = config(tmp_path)
    done = run_cli("import", str(path), str(folder), "--as", "train")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "4 images" in done.stdout and "ignored 3 files" in done.stdout
    assert "cat/caf\\xe9.png (its name is not UTF-8: rename it)" in done.stdout
    assert "dog/gone.png (a broken link)" in done.stdout
    assert "dog/elsewhere (a link to a folder: not followed)" in done.stdout
    assert preprocess.run(cfg).complete


def test_an_unreadable_class_folder_changes_nothing(tmp_path, monkeypatch):
    """A class folder that cannot be listed (no permission; root reads everything, so it is
    simulated) is an error naming it, and the earlier import stays whole."""
    import os

    folder = folder_of(tmp_path / "photos", {"cat": 3, "dog": 2})
    _, cfg = config(tmp_path)
    ingest.run(cfg, folder, split="train")
    before = (cfg.data_root / "imported" / "train" / "manifest.jsonl").read_bytes()
    real = os.scandir

    def no_permission(path="."):
        if Path(path) == folder / "cat":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    with pytest.raises(DataError, match=r"photos/cat: cannot be read \(Permission denied\)"):
        ingest.run(cfg, folder, split="train")
    monkeypatch.undo()
    assert (cfg.data_root / "imported" / "train" / "manifest.jsonl").read_bytes() == before
    assert len(manifest(cfg, "train")) == 5
