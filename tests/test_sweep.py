"""`synthflux sweep`: the grid's points are whole runs whose results equal separate runs; the
images are generated once and shared; a re-run resumes; the exchange rate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import tomllib
from digits import keep_classes, write_digits

from conftest import BASE_CONFIG, deep_update, run_cli, save_config
from synthflux import ingest, sweep
from synthflux.layout import DataLayout
from synthflux.pipeline import run_pipeline
from synthflux.sweep_table import exchange_rate

DIGITS = ["0", "1"]


@pytest.fixture
def two_digits(tmp_path: Path) -> tuple[Path, Path]:
    """Real images of two classes, '0' and '1', as train and test ImageFolders."""
    train, test = write_digits(tmp_path / "digits")
    keep_classes((train, test), DIGITS)
    return train, test


def digit_config(
    tmp_path: Path, tiny_model: Path, name: str, data: Path, **more
) -> tuple[Path, object]:
    raw = deep_update(BASE_CONFIG, {
        "classes": [{"name": d, "prompts": [f"the digit {d}"]} for d in DIGITS],
        "generate": {"model": str(tiny_model), "batch_size": 3},
        "preprocess": {"width": 8, "height": 8, "shard_size": 64},
        "train": {"epochs": 2, "blocks": [4], "val_fraction": 0.25},
        "cnn": {"backend": "reference"},
    })  # fmt: skip
    raw = deep_update(raw, more) | {"data_root": str(data)}
    return save_config(tmp_path / name, raw)


def test_a_sweep_point_equals_a_separate_run_and_the_sweep_resumes(
    tmp_path, tiny_model, two_digits
):
    train, test = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "sweep.toml", tmp_path / "data",
                             sweep={"images": [2, 4], "sources": ["synthetic", "real", "both"]})  # fmt: skip
    ingest.run(cfg, train, split="train")
    ingest.run(cfg, test, split="test")
    said: list[str] = []
    rows = sweep.run(path, say=said.append)
    assert rows is not None
    assert [r["point"] for r in rows] == [
        "synthetic-n2",
        "synthetic-n4",
        "real",
        "both-n2",
        "both-n4",
    ]
    layout = cfg.layout
    # The images were generated once, at N = 4, and the points link them.
    (images,) = layout.sweep.glob("images-*")
    assert len(list(images.glob("generated/*/*.png"))) == 8
    n4 = layout.sweep_point("synthetic-n4") / "generated" / "0" / "0-000000.png"
    assert n4.stat().st_ino == (images / "generated" / "0" / "0-000000.png").stat().st_ino
    # A point equals a separate run of its config, image for image and prediction for prediction.
    _, alone = digit_config(tmp_path, tiny_model, "alone.toml", tmp_path / "alone",
                            images_per_class=2, train={"sources": ["synthetic", "real"]})  # fmt: skip
    ingest.run(alone, train, split="train")
    ingest.run(alone, test, split="test")
    run_pipeline(alone, say=lambda line: None)
    point = layout.sweep_point("both-n2")
    assert (point / "generated/manifest.jsonl").read_bytes() == alone.layout.manifest.read_bytes()
    assert (
        point / "evaluation/predictions.csv"
    ).read_bytes() == alone.layout.evaluation_csv.read_bytes()
    mine = json.loads(alone.layout.evaluation_summary.read_text())["splits"]["test"]["accuracy"]
    assert next(r for r in rows if r["point"] == "both-n2")["test:test"] == mine
    # The table, the plot and the summary; a second run only reads them back.
    with open(layout.sweep_table) as f:
        table = list(csv.DictReader(f))
    assert [float(r["test:test"]) for r in table] == [r["test:test"] for r in rows]
    assert (
        table[2]["real_per_class"] == str(rows[2]["real_per_class"])
        and rows[2]["real_per_class"] > 100
    )
    assert layout.sweep_plot.read_bytes().startswith(b"\x89PNG")
    again: list[str] = []
    assert sweep.run(path, say=again.append) == rows
    assert sum("evaluated and current; skipped" in line for line in again) == 5


def test_sweep_shards_need_the_images_first_and_vary_any_setting(tmp_path, tiny_model, two_digits):
    _, test = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data", sweep={
        "images": [3], "sources": ["synthetic"], "vary": {"train.lr": [0.001, 0.01]}})  # fmt: skip
    ingest.run(cfg, test, split="test")
    early = run_cli("sweep", str(path), "--shard", "0/2")
    assert early.returncode == 2 and "--only-generate" in early.stderr
    assert run_cli("sweep", str(path), "--only-generate").returncode == 0
    for i in (0, 1):
        assert run_cli("sweep", str(path), "--shard", f"{i}/2").returncode == 0
    rows = sweep.run(path, say=lambda line: None)
    assert [r["train.lr"] for r in rows] == ["0.001", "0.01"]
    for r, lr in zip(rows, ("0.001", "0.01"), strict=True):  # each point trained with its value
        job = DataLayout(cfg.layout.sweep_point(r["point"])).job_args.read_text().split()
        assert job[job.index("--lr") + 1] == lr
    bad = save_config(tmp_path / "bad.toml", {**_raw(path), "sweep": {"vary": {"train.lrr": [1]}}})[
        0
    ]
    result = run_cli("sweep", str(bad))
    assert (
        result.returncode == 2
        and "train.lrr" in result.stderr
        and "did you mean 'lr'" in result.stderr
    )


def _raw(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_exchange_rate():
    # real-only accuracy 0.8 with 50 real images per class; synthetic reaches 0.8 between
    # N = 100 (0.7) and N = 1000 (0.9): at N = sqrt(100 * 1000) = 316 in log N, so 6.3 per real.
    assert exchange_rate(0.8, 50, [(100, 0.7), (1000, 0.9)]).startswith(
        "one real image ≈ 6.3 synthetic"
    )
    assert "did not reach" in exchange_rate(0.95, 50, [(100, 0.7), (1000, 0.9)])
    assert exchange_rate(0.5, 50, [(100, 0.7)]) == "one real image ≈ at most 2 synthetic"


def test_a_bad_sweep_section_is_one_line(tmp_path):
    for sweep_section, message in (
        ({"images": [0]}, "sweep.images.0 = 0: Input should be greater than 0"),
        (
            {"sourcs": ["real"]},
            "sweep.sourcs = ['real']: not a known setting; did you mean 'sources'?",
        ),
        # what the sweep sets for each point itself cannot be varied: the row would lie
        ({"vary": {"train.sources": [["real"]]}}, "sweep.vary.train.sources: the sweep sets it"),
        ({"vary": {"images_per_class": [5]}}, "sweep.vary.images_per_class: the sweep sets it"),
        ({"vary": {"data_root": ["x"]}}, "sweep.vary.data_root: the sweep sets it"),
        ({"vary": {"classes": [[]]}}, "sweep.vary.classes: the sweep sets it"),
        # a whole section: the row would name one setting while every other changed too
        ({"vary": {"train": [{"epochs": 1}]}}, "sweep.vary.train: a whole section"),
        ({"vary": {"train.lr": [0.01, 0.01]}}, "sweep.vary.train.lr: 0.01 is listed twice"),
        ({"vary": {"generate.devices": [["cpu"]]}}, "where images are made changes no result"),
        (None, "has no [sweep] section"),
    ):
        raw = BASE_CONFIG | {"data_root": str(tmp_path / "d")}
        if sweep_section is not None:
            raw["sweep"] = sweep_section
        path, _ = save_config(tmp_path / "c.toml", raw)  # (other commands ignore [sweep])
        result = run_cli("sweep", str(path))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "d").exists()


def test_a_sweep_of_real_guided_images(tmp_path, tiny_model, two_digits):
    """The shared images and every point see the real images they start from."""
    train, test = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "g.toml", tmp_path / "data",
                             generate={"init_source": "train", "steps": 4},
                             sweep={"images": [2, 3], "sources": ["synthetic"]})  # fmt: skip
    ingest.run(cfg, train, split="train")
    ingest.run(cfg, test, split="test")
    rows = sweep.run(path, say=lambda line: None)
    assert rows is not None and [r["point"] for r in rows] == ["synthetic-n2", "synthetic-n3"]
    point = cfg.layout.sweep_point("synthetic-n3")
    records = [
        json.loads(line) for line in (point / "generated/manifest.jsonl").read_text().splitlines()
    ]
    assert len(records) == 6 and all(r["parent"]["source"] == "train" for r in records)


def test_a_point_is_current_only_while_its_whole_chain_is(tmp_path, tiny_model, two_digits):
    """A changed generation setting makes new images: every point that used the old ones is
    run again, not called current from evaluate's key."""
    _, test = two_digits
    sweep_section = {"images": [2], "sources": ["synthetic"]}
    path, cfg = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data", sweep=sweep_section)
    ingest.run(cfg, test, split="test")
    assert sweep.run(path, say=lambda line: None) is not None
    path, cfg = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data",
                             sweep=sweep_section, generate={"steps": 3})  # fmt: skip
    status = run_cli("status", str(path))  # the sweep's points, after the stages
    assert "sweep: 0 of 1 points done" in status.stdout, status.stderr
    assert "table.csv is from before: settings or points have changed" in status.stdout
    assert "  synthetic-n2  to run" in status.stdout
    said: list[str] = []
    assert sweep.run(path, say=said.append) is not None
    assert not any("skipped" in line for line in said), said
    point = cfg.layout.sweep_point("synthetic-n2")
    records = [json.loads(line) for line in (point / "generated/manifest.jsonl").open()]
    assert {r["steps"] for r in records} == {3}
    again: list[str] = []
    sweep.run(path, say=again.append)
    assert sum("evaluated and current; skipped" in line for line in again) == 1
    status = run_cli("status", str(path)).stdout
    assert "sweep: 1 of 1 points done; " in status
    # the first setting's images are used by no point now: status sizes them, --prune frees them
    current = {c.data_root for c in sweep.plan(path).images.values()}
    (old,) = [f for f in cfg.layout.sweep.glob("images-*") if f not in current]
    assert "sweep: 1 folders under " in status and "--prune` removes them" in status
    pruned = run_cli("sweep", str(path), "--prune")
    assert pruned.returncode == 0 and f"sweep: removed {old}" in pruned.stdout, pruned.stderr
    assert not old.exists() and "--prune" not in run_cli("status", str(path)).stdout
    assert all(sweep._done(c) for _, c in sweep.plan(path).points)  # what is used stays


def test_two_points_never_share_a_data_root(tmp_path, tiny_model):
    """Values that differ only where the folder name's sanitiser replaces characters, or past
    its length, name two folders."""
    long = "x" * 130
    path, _ = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data", sweep={
        "images": [2], "sources": ["synthetic"],
        "vary": {"style": ["a b", "a_b", "a/b", long + "1", long + "2"]}})  # fmt: skip
    grid = sweep.plan(path)
    names = [p.name for p, _ in grid.points]
    assert len(set(names)) == len(names) == 5
    assert len({cfg.data_root for _, cfg in grid.points}) == 5
    # values that hold the separators: "style=a-negative_prompt=b" could be two settings
    path, _ = digit_config(tmp_path, tiny_model, "sep.toml", tmp_path / "data", sweep={
        "images": [2], "sources": ["synthetic"],
        "vary": {"style": ["a", "a-negative_prompt=b"],
                 "negative_prompt": ["b-negative_prompt=c", "c"]}})  # fmt: skip
    roots = [cfg.data_root for _, cfg in sweep.plan(path).points]
    assert len(set(roots)) == len(roots) == 4
    assert names[1] == "synthetic-n2-style=a_b"  # readable where nothing was replaced
    assert all(len(n) <= 113 for n in names)


def test_images_per_real_with_a_sweep_of_n_is_refused(tmp_path, tiny_model, two_digits):
    train, _ = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data",
                             generate={"init_source": "train", "images_per_real": 2},
                             sweep={"images": [2, 4], "sources": ["synthetic"]})  # fmt: skip
    ingest.run(cfg, train, split="train")
    done = run_cli("sweep", str(path))
    assert done.returncode == 2, done.stderr
    assert "generate.images_per_real = 2 makes that many images per real image" in done.stderr


def test_one_real_only_run_serves_every_generation_setting(tmp_path, tiny_model, two_digits):
    """A real-only CNN never sees guidance or style: the sweep trains it once per distinct
    training setup, and each row of the real baseline shows that run's numbers."""
    train, test = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "s.toml", tmp_path / "data", sweep={
        "images": [2], "sources": ["real", "synthetic"],
        "vary": {"generate.guidance_scale": [1.0, 2.0], "train.lr": [0.001, 0.01]}})  # fmt: skip
    ingest.run(cfg, train, split="train")
    ingest.run(cfg, test, split="test")
    said: list[str] = []
    rows = sweep.run(path, say=said.append)
    assert rows is not None and len(rows) == 8
    running = [line for line in said if line.endswith(" of 6)")]  # 2 real + 4 synthetic runs
    assert len(running) == 6, said
    real = [r for r in rows if r["sources"] == "real"]
    for lr in ("0.001", "0.01"):  # the real rows of one lr share a run; two lrs, two runs
        same = [r for r in real if r["train.lr"] == lr]
        assert [r["generate.guidance_scale"] for r in same] == ["1.0", "2.0"]
        assert same[0]["test:test"] == same[1]["test:test"]
    points = sorted(p.name for p in (cfg.layout.sweep / "points").iterdir())
    assert [p for p in points if p.startswith("real")] == [
        "real-train.lr=0.001",
        "real-train.lr=0.01",
    ]


def test_with_a_filter_rows_say_how_many_images_the_cnn_learned_from(
    tmp_path, tiny_model, two_digits
):
    _, test = two_digits
    path, cfg = digit_config(tmp_path, tiny_model, "f.toml", tmp_path / "data",
                             filter={"keep_top": 1},
                             sweep={"images": [2, 3], "sources": ["synthetic"]})  # fmt: skip
    ingest.run(cfg, test, split="test")
    said: list[str] = []
    rows = sweep.run(path, say=said.append)
    assert rows is not None
    assert [(r["synthetic_per_class"], r["kept_per_class"]) for r in rows] == [(2, 1.0), (3, 1.0)]
    assert all(r["train_images"] == 2 for r in rows)  # 1 per class, as the table now says
    assert any("kept/class" in line for line in said)


def test_prune_keeps_what_another_configs_sweep_uses_and_a_moved_root_stays_done(
    tmp_path, tiny_model, two_digits
):
    """Two configs sweep in one data root: each one's --prune keeps the other's points; the
    status of one never calls the other's table its own; the points' links are relative, so
    the data root moved whole is still done."""
    _, test = two_digits
    data = tmp_path / "data"
    grid = {"images": [2], "sources": ["synthetic"]}
    a, cfg = digit_config(tmp_path, tiny_model, "a.toml", data,
                          sweep=grid | {"vary": {"style": ["x", "y"]}})  # fmt: skip
    b, _ = digit_config(tmp_path, tiny_model, "b.toml", data,
                        sweep=grid | {"vary": {"style": ["x", "z"]}})  # fmt: skip
    ingest.run(cfg, test, split="test")
    assert sweep.run(a, say=lambda line: None) is not None
    assert sweep.run(b, say=lambda line: None) is not None
    status = run_cli("status", str(a)).stdout
    assert "2 of 2 points done; run `synthflux sweep CONFIG` to write the table" in status
    assert "--prune" not in status  # b's points are b's, not unused
    pruned = run_cli("sweep", str(a), "--prune")
    assert "removed 0 unused folders" in pruned.stdout, pruned.stderr
    assert all(sweep._done(c) for _, c in sweep.plan(b).points)
    # b no longer sweeps z: a's --prune may take what only z used
    digit_config(tmp_path, tiny_model, "b.toml", data, sweep=grid | {"vary": {"style": ["x"]}})
    pruned = run_cli("sweep", str(a), "--prune")
    assert "style=z" in pruned.stdout and "removed 2 unused folders" in pruned.stdout
    # moved whole, the data root keeps its points done
    assert sweep.run(a, say=lambda line: None) is not None
    moved = tmp_path / "moved"
    data.rename(moved)
    status = run_cli("status", str(a), "--data", str(moved)).stdout
    assert "sweep: 2 of 2 points done; " in status and str(moved / "sweep" / "table.csv") in status
