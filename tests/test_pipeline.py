"""`synthflux run` and `synthflux report` end to end on the tiny model (reference classifier)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
from PIL import Image

from conftest import run_cli, tree_bytes
from synthflux.pipeline import run_pipeline
from synthflux.records import plan_images


def test_run_then_rerun_skips_verified_work_and_from_redoes(write_config):
    _, cfg = write_config(cnn={"backend": "reference"})
    lines: list[str] = []
    run_pipeline(cfg, say=lines.append)
    assert any("8 generated" in line for line in lines)
    assert any("classified 8 images" in line for line in lines)
    first = tree_bytes(cfg.data_root, "**/*.npz") | tree_bytes(cfg.data_root, "**/*.png")

    again: list[str] = []
    run_pipeline(cfg, say=again.append)
    assert any("8 already done, 0 generated" in line for line in again)
    assert any("3 already done" in line for line in again)  # 3 output shards reused
    assert any("classify: predictions are complete and verified; skipped" in line for line in again)

    redo: list[str] = []
    run_pipeline(cfg, from_stage="preprocess", say=redo.append)
    assert any("removed" in line and "preprocessed" in line for line in redo)
    assert any("0 already done" in line and "preprocess" in line for line in redo)
    assert any("classified 8 images" in line for line in redo)
    assert first == tree_bytes(cfg.data_root, "**/*.npz") | tree_bytes(cfg.data_root, "**/*.png")

    with open(cfg.data_root / "predictions" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["id"]) for r in rows) == [j.id for j in plan_images(cfg)]
    for r in rows:
        p = np.array([float(r["p_cat"]), float(r["p_dog"])])
        assert abs(p.sum() - 1) < 1e-5
        assert r["predicted"] == ("cat", "dog")[int(p.argmax())]


def test_run_backend_on_the_command_line_skips_what_it_made(write_config):
    """`run --backend reference` over a config that says docker: the second run finds the
    reference backend's results complete (they belong to a backend) and skips them."""
    path, _ = write_config(cnn={"backend": "docker"})
    assert run_cli("run", str(path), "--backend", "reference").returncode == 0
    again = run_cli("run", str(path), "--backend", "reference")
    assert again.returncode == 0, again.stderr
    for stage in ("train", "classify", "evaluate", "report"):
        assert re.search(rf"^{stage}: .* are complete and verified; skipped", again.stdout, re.M), (
            again.stdout
        )


def test_evaluate_after_the_manifest_lost_an_image_is_a_clear_error(write_config):
    path, cfg = write_config(cnn={"backend": "reference"})
    assert run_cli("run", str(path)).returncode == 0
    manifest = cfg.data_root / "generated" / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    done = run_cli("evaluate", str(path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"shard-\d+\.npz: image id \d+ is not in .*manifest\.jsonl", done.stderr)


def test_report_shows_every_class_with_captions(write_config):
    path, cfg = write_config(cnn={"backend": "reference"})
    assert run_cli("run", str(path)).returncode == 0
    result = run_cli("report", str(path), "--per-class", "3")
    assert result.returncode == 0, result.stderr
    assert "6 of 8 images shown" in result.stdout
    page = (cfg.data_root / "report" / "index.html").read_text()
    summary = json.loads((cfg.data_root / "predictions" / "summary.json").read_text())
    by_class = page.split("<h2>Predictions by class</h2>")[1]
    assert by_class.count("<figure") == 6 and by_class.count("data:image/png;base64,") == 6
    # The learning curves and each split's confusion matrix are pictures on the page too.
    assert 'alt="learning curves"' in page and 'alt="validation"' in page
    assert 'src="http' not in page  # self-contained
    assert f"{summary['accuracy']:.3f}" in page
    for rec in map(
        json.loads, (cfg.data_root / "generated/manifest.jsonl").read_text().splitlines()[:3]
    ):
        assert f"seed {rec['seed']}" in page
    sheet = Image.open(cfg.data_root / "report" / "contact-sheet.png")
    assert sheet.width >= 3 * 128 and sheet.height > 2 * 128


def test_report_before_classify_is_a_clear_error(write_config):
    path, _ = write_config()
    result = run_cli("report", str(path))
    assert result.returncode == 2 and "run `synthflux classify` first" in result.stderr


def test_a_shard_whose_images_were_all_rejected_classifies(write_config):
    """preprocess writes an empty shard when every image in it is rejected; classify copes."""
    from synthflux import classify, generate, preprocess, train
    from synthflux.records import mixed_records

    _, cfg = write_config(cnn={"backend": "reference"})
    generate.run(cfg)
    manifest = cfg.data_root / "generated" / "manifest.jsonl"
    order = list(mixed_records(manifest, "", salt="synthetic"))  # preprocess's shard order
    for rec in order[3:6]:  # all of output shard 1 (shard_size 3)
        (cfg.data_root / "generated" / rec["file"]).write_bytes(b"not a png")
    assert preprocess.run(cfg).complete
    train.run(cfg)
    summary = classify.run(cfg)
    assert (summary.images, summary.shards) == (5, 3)
    with open(cfg.data_root / "predictions" / "predictions.csv") as f:
        got = [int(r["id"]) for r in csv.DictReader(f)]
    assert got == [r["id"] for r in order[:3] + order[6:]]


def test_new_shard_bytes_make_run_classify_again_and_status_agrees(write_config):
    """Same ids and labels but other pixels (a preprocess setting changed): old predictions
    no longer count, for `run` and for `status` alike."""
    from synthflux.config import load_config
    from synthflux.status import pipeline_status

    path, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=lambda _: None)
    assert pipeline_status(cfg, 1).stages["classify"].complete
    again: list[str] = []
    run_pipeline(cfg, say=again.append)
    assert any("skipped" in line for line in again)
    assert pipeline_status(cfg, 1).stages["classify"].complete  # a skipped re-run is still complete

    _, changed = write_config(cnn={"backend": "reference"}, preprocess={"mean": [0.25]})
    lines: list[str] = []
    run_pipeline(changed, say=lines.append)
    assert any("classified 8 images" in line for line in lines)
    assert load_config(path).preprocess.mean == [0.25]


def test_report_on_predictions_from_another_config_is_a_clear_error(write_config):
    path, cfg = write_config(cnn={"backend": "reference"})
    assert run_cli("run", str(path)).returncode == 0
    summary_path = cfg.data_root / "predictions" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps(summary | {"classes": ["cat", "bird"]}))
    result = run_cli("report", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lacks columns ['p_bird']" in result.stderr
    summary_path.write_text("{not json")
    result = run_cli("report", str(path))
    assert result.returncode == 2 and "unreadable predictions" in result.stderr


def test_backend_none_collects_and_checks_what_another_process_wrote(write_config):
    import pytest

    from synthflux import classify
    from synthflux.errors import ClassifyError

    _, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=lambda _: None)
    csv_path = cfg.data_root / "predictions" / "predictions.csv"
    before = csv_path.read_bytes()
    assert classify.run(cfg, backend="none").images == 8
    assert csv_path.read_bytes() == before
    (cfg.data_root / "predictions" / "synthetic" / "shard-00001.probs.npz").unlink()
    with pytest.raises(ClassifyError, match=r"shard-00001\.probs\.npz not found"):
        classify.run(cfg, backend="none")


def test_report_text_in_any_script_is_drawn_with_a_font_that_has_it(write_config):
    """é and 猫 in prompts: each is drawn with a font that has it, not as a missing-glyph box."""
    from PIL import Image, ImageDraw

    from conftest import unavailable
    from synthflux import drawing

    for char in "é猫":
        if ord(char) not in drawing._characters(drawing._font_for(char)):
            unavailable(f"no font on this machine has {char!r} (.ci/run installs one)")

    def drawn(text: str) -> bytes:
        im = Image.new("L", (40, 20), 255)
        drawing.Writer(ImageDraw.Draw(im), size=14).text((2, 2), text)
        return im.tobytes()

    box = drawn("\U000f0000")  # a private-use character no font has: the box
    assert drawn("é") != box and drawn("猫") != box and drawn("猫") != drawn("é")
    classes = [{"name": "cat", "prompts": ["un chat café"]}, {"name": "dog", "prompts": ["猫"]}]
    path, cfg = write_config(classes=classes, cnn={"backend": "reference"})
    assert run_cli("run", str(path)).returncode == 0
    done = run_cli("report", str(path))
    assert done.returncode == 0, done.stderr
    assert "un chat café" in (cfg.data_root / "report" / "index.html").read_text()
