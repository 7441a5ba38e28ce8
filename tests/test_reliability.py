"""What may be called complete, what is trusted, and how runs stop: across the stages.

A result is current only if everything it was computed from is unchanged; a file nothing
vouches for is never trusted; the bytes are the same whatever the sharding or resume; Ctrl-C,
SIGTERM and OS errors end a run with one line and lose nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import BASE_CONFIG, REPO, run_cli, run_until_held, save_config, tree_bytes
from synthflux import classify, generate, lineage, preprocess
from synthflux.cli import main
from synthflux.layout import DataLayout
from synthflux.pipeline import run_pipeline
from synthflux.records import PNG_KEY
from synthflux.status import pipeline_status
from synthflux.storage import ShardSpec
from synthflux.weights import init_weights, save_weights

THREE_CLASSES = [
    {"name": "cat", "prompts": ["a cat", "a cat asleep"], "images": 35},
    {"name": "dog", "prompts": ["a dog in a park"], "images": 37},
    {"name": "fox", "prompts": ["a red fox"], "images": 33},
]


def images(data: Path) -> dict[str, bytes]:
    return tree_bytes(data / "generated", "**/*.png") | {
        "manifest.jsonl": (data / "generated" / "manifest.jsonl").read_bytes()
    }


def quiet(_: str) -> None:
    pass


# --- the same bytes whatever the sharding or resume -----------------------------------------


@pytest.mark.slow
def test_sharding_limits_and_kills_give_the_bytes_of_one_run(write_config, tmp_path):
    """105 images in odd counts per class, batch 4: batches do not divide the classes, and a
    kill lands inside a batch. Before batches were canonical, single pixels differed."""
    many = {"classes": THREE_CLASSES, "generate": {"batch_size": 4}}
    _, whole = write_config(data=tmp_path / "whole", name="w.toml", **many)
    assert generate.run(whole).generated == 105
    want = images(whole.data_root)

    _, sharded = write_config(data=tmp_path / "sharded", name="s.toml", **many)
    for i in (1, 0):  # the order does not matter either
        generate.run(sharded, shard=ShardSpec(i, 2))
    assert images(sharded.data_root) == want

    _, limited = write_config(data=tmp_path / "limited", name="l.toml", **many)
    first = generate.run(limited, limit=7)
    assert first.generated == 8 and not first.manifest_complete  # whole batches: 2 of 4
    generate.run(limited)
    assert images(limited.data_root) == want

    path, killed = write_config(data=tmp_path / "killed", name="k.toml", **many)
    proc = run_until_held(["generate", str(path)], hold="image:10")  # inside the third batch
    proc.kill()
    proc.wait()
    assert len(list((killed.data_root / "generated").glob("*/*.png"))) == 10
    again = generate.run(killed)
    assert (again.reused, again.generated) == (8, 97)  # the torn batch is made again, whole
    assert images(killed.data_root) == want


def test_growing_one_class_keeps_the_others_images(write_config, tmp_path):
    _, cfg = write_config()
    generate.run(cfg)
    dog = {p: p.stat().st_mtime_ns for p in (cfg.data_root / "generated" / "dog").glob("*.png")}
    classes = [{**BASE_CONFIG["classes"][0], "images": 6}, BASE_CONFIG["classes"][1]]
    _, grown = write_config(classes=classes)
    again = generate.run(grown)
    # cat's last batch (images 3..5 now, only 3 before) is made whole; dog is untouched.
    assert again.generated == 3 and again.reused == 7
    assert {p: p.stat().st_mtime_ns for p in dog} == dog


# --- done-ness: every input counts ----------------------------------------------------------


def test_new_weights_or_a_lost_output_make_run_classify_again(write_config, tmp_path):
    _, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=quiet)
    layout = DataLayout(cfg.data_root)
    trained = layout.default_weights.read_bytes()
    assert lineage.is_current(cfg, "classify")
    # Other valid weights in place of the trained ones: neither the model nor the
    # predictions are current; run trains again (the same training: the same bytes), and
    # then the old predictions are those of these weights again.
    save_weights(layout.default_weights, init_weights(16, 16, 1, 2, seed=99))
    assert not pipeline_status(cfg, 1).stages["train"].complete
    assert not lineage.is_current(cfg, "classify")
    lines: list[str] = []
    run_pipeline(cfg, say=lines.append)
    assert any(line.startswith("train: trained on synthetic") for line in lines)
    assert layout.default_weights.read_bytes() == trained
    assert any("predictions are complete and verified; skipped" in line for line in lines)
    # Weights of the user's own (classify.weights): replacing them re-classifies.
    own = tmp_path / "own.npz"
    save_weights(own, init_weights(16, 16, 1, 2, seed=5))
    _, mine = write_config(cnn={"backend": "reference"}, classify={"weights": str(own)})
    run_pipeline(mine, say=quiet)
    save_weights(own, init_weights(16, 16, 1, 2, seed=6))
    assert not lineage.is_current(mine, "classify")
    # A lost output (summary.json) is not a complete result either.
    run_pipeline(mine, say=quiet)
    layout.summary.unlink()
    assert not pipeline_status(mine, 1).stages["classify"].complete
    lines = []
    run_pipeline(mine, say=lines.append)
    assert any(line.startswith("classify: classified") for line in lines)
    assert layout.summary.is_file()


def test_a_seed_change_gives_what_a_fresh_run_gives(write_config, tmp_path):
    _, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=quiet)
    _, reseeded = write_config(seed=8, cnn={"backend": "reference"})
    run_pipeline(reseeded, say=quiet)
    _, fresh = write_config(data=tmp_path / "fresh", name="f.toml", seed=8,
                            cnn={"backend": "reference"})  # fmt: skip
    run_pipeline(fresh, say=quiet)
    for pattern in ("**/*.png", "**/*.npz", "**/*.csv"):
        assert tree_bytes(reseeded.data_root, pattern) == tree_bytes(fresh.data_root, pattern)


def test_preprocess_refuses_an_unfinished_or_edited_generation(write_config):
    path, cfg = write_config()
    assert run_cli("generate", str(path), "--limit", "3").returncode == 0
    done = run_cli("preprocess", str(path))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "generate is incomplete" in done.stderr
    assert not (cfg.data_root / "preprocessed" / "synthetic" / "dataset.json").exists()
    generate.run(cfg)
    manifest = cfg.data_root / "generated" / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    done = run_cli("preprocess", str(path))
    assert done.returncode == 2 and "manifest.jsonl changed since generate wrote it" in done.stderr
    generate.run(cfg)  # rebuilds the manifest from the part files
    assert preprocess.run(cfg).complete


def test_status_asks_what_run_asks(write_config):
    path, cfg = write_config(generate={"batch_size": 1})
    generate.run(cfg)
    assert pipeline_status(cfg, 1).stages["generate"].complete
    # Another scheduler: every image is made again by run, so none is done.
    _, other = write_config(generate={"batch_size": 1, "scheduler": "euler"})
    assert pipeline_status(other, 1).stages["generate"].shards[0].done == 0
    # A corrupted PNG.
    victim = next((cfg.data_root / "generated" / "dog").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:200])
    state = pipeline_status(cfg, 1).stages["generate"]
    assert not state.complete and state.shards[0].done == 7
    generate.run(cfg)
    # A killed run's images, not yet in any part file, count: a re-run would keep them.
    for part in (cfg.data_root / "generated" / "parts").glob("*.jsonl"):
        part.unlink()
    (cfg.data_root / "generated" / "manifest.jsonl").unlink()
    state = pipeline_status(cfg, 1).stages["generate"]
    assert state.shards[0].done == 8 and not state.complete  # manifest not merged yet
    assert "already done" in run_cli("generate", str(path)).stdout


def test_a_failed_classify_leaves_the_good_results_current(write_config, tmp_path):
    path, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=quiet)
    before = tree_bytes(cfg.data_root / "predictions")
    julia = str(tmp_path / "no-julia")
    write_config(cnn={"backend": "local", "julia": julia})
    done = run_cli("classify", str(path), "--backend", "local")
    assert done.returncode == 2
    assert tree_bytes(cfg.data_root / "predictions") == before
    assert (cfg.data_root / "predictions" / "stage.json").is_file()
    assert lineage.is_current(cfg, "classify")


# --- integrity ----------------------------------------------------------------------------


def test_replaced_pixels_under_a_kept_record_are_made_again(write_config):
    _, cfg = write_config()
    generate.run(cfg)
    out = cfg.data_root / "generated"
    record = json.loads(out.joinpath("manifest.jsonl").read_text().splitlines()[0])
    png = out / record["file"]
    with Image.open(png) as im:
        text = im.text[PNG_KEY]
        tampered = Image.fromarray(255 - np.asarray(im))
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, text)  # the record kept, the pixels replaced
    tampered.save(png, pnginfo=info)
    for part in (out / "parts").glob("*.jsonl"):  # so only the embedded record could vouch
        part.unlink()
    again = generate.run(cfg)
    assert again.generated == 3  # the tampered image's whole batch
    fresh = json.loads(out.joinpath("manifest.jsonl").read_text().splitlines()[0])
    assert fresh["sha256"] == record["sha256"]  # the original bytes again, not the tampered hash


# --- interrupts and OS errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "hold", "signum"),
    [
        ("preprocess", "shard:2", signal.SIGINT),
        ("preprocess", "shard:2", signal.SIGTERM),
        ("generate", "image:5", signal.SIGTERM),
        ("generate", "image:5", signal.SIGINT),
    ],
)
def test_interrupts_end_promptly_with_one_line(write_config, command, hold, signum):
    path, cfg = write_config(images_per_class=12, generate={"batch_size": 1},
                             preprocess={"shard_size": 2, "workers": 2})  # fmt: skip
    if command == "preprocess":
        generate.run(cfg)
    proc = run_until_held([command, str(path)], hold=hold, stderr=subprocess.PIPE)
    os.killpg(proc.pid, signum)  # to the group, as Ctrl-C in a shell
    os.killpg(proc.pid, signal.SIGCONT)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10
    assert proc.returncode == 130, stderr
    lines = [
        line for line in stderr.decode().splitlines() if "interrupted" in line or "Error" in line
    ]
    assert lines == [f"synthflux {command}: interrupted; re-run to resume"], stderr.decode()
    assert "Traceback" not in stderr.decode()
    if command == "generate":  # what it made is in its part file, so nothing is made twice
        part = next((cfg.data_root / "generated" / "parts").glob("part-*.jsonl"))
        assert len(part.read_text().splitlines()) == 5
    assert run_cli(command, str(path)).returncode == 0


def test_two_classify_runs_on_one_data_root(tmp_path, monkeypatch):
    from classify_data import control_standin, fake_julia, make_data, release_standin
    from classify_data import write_config as classify_config

    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    fx = make_data(tmp_path / "data")
    path, _ = classify_config(tmp_path, fx.root, fx.classes, backend="local", julia=str(exe))
    control_standin(fx, hold=True)
    first = subprocess.Popen(
        [os.sys.executable, "-m", "synthflux", "classify", str(path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((fx.root / "predictions").glob(".classify-*")):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = run_cli("classify", str(path))
        assert second.returncode == 2
        assert "another classify run (pid" in second.stderr and "is using" in second.stderr
    finally:
        release_standin(fx)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr  # its staging folder was left alone


def test_a_data_root_that_is_a_file_is_one_line(write_config, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    path, _ = write_config()
    for command in ("generate", "preprocess", "status"):
        done = run_cli(command, str(path), "--data", str(not_a_folder))
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and str(not_a_folder) in done.stderr


def test_a_full_disk_is_one_line_and_a_rerun_completes(write_config, tmp_path, monkeypatch, capsys):
    path, cfg = write_config()
    import synthflux.png_writer as writer_module  # (where generate writes its PNGs)

    real, calls = writer_module.write_bytes_atomic, []

    def fill_up(target: Path, data: bytes, durable: bool = True) -> None:
        calls.append(target)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        real(target, data, durable)

    monkeypatch.setattr(writer_module, "write_bytes_atomic", fill_up)
    assert main(["generate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synthflux generate: error: ")
    assert err[0].endswith(": No space left on device") and ".png" in err[0]
    out = cfg.data_root / "generated"
    assert not list(out.rglob(".*.tmp"))  # nothing half-written
    assert len(list(out.glob("*/*.png"))) == 4
    monkeypatch.setattr(writer_module, "write_bytes_atomic", real)
    assert main(["generate", str(path)]) == 0
    _, fresh = write_config(data=tmp_path / "fresh", name="f.toml")
    generate.run(fresh)
    assert images(cfg.data_root) == images(fresh.data_root)


def test_no_permission_is_one_line(write_config, monkeypatch, capsys):
    path, cfg = write_config()
    generate.run(cfg)
    import synthflux.storage as storage

    def denied(*args: object, dir: str = "", **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(storage.tempfile, "mkstemp", denied)
    assert main(["preprocess", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("preprocessed/synthetic: Permission denied"), err


def test_status_and_report_read_a_finished_data_root_without_writing(write_config, tmp_path):
    path, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=quiet)

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {
            str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(cfg.data_root.rglob("*")) if p.is_file()
        }  # fmt: skip

    before = snapshot()
    done = run_cli("status", str(path))
    assert done.returncode == 0 and "classify    complete" in done.stdout, done.stdout
    report = run_cli("report", str(path), "--out", str(tmp_path / "elsewhere"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "elsewhere" / "index.html").is_file()
    assert snapshot() == before  # on a read-only mount, both would work


# --- smaller things ---------------------------------------------------------------------------


def test_the_worker_count_does_not_redo_shards(write_config):
    _, cfg = write_config(preprocess={"workers": 1})
    generate.run(cfg)
    preprocess.run(cfg)
    _, more = write_config(preprocess={"workers": 2})
    again = preprocess.run(more)
    assert again.shards_reused == again.shards_total == 3 and again.shards_done == 0


def test_leftovers_of_a_smaller_or_killed_run_are_removed(write_config, tmp_path):
    from synthflux.storage import TEMP_TAG
    from synthflux.tiny_model import save_tiny_model

    # A half-built tiny model of a process that is gone.
    models = tmp_path / "models"
    dead = TEMP_TAG.rsplit("-", 1)[0] + "-999999"
    (models / f".tiny.{dead}.abcd1234.tmp" / "unet").mkdir(parents=True)
    folder = save_tiny_model(models / "tiny")
    assert sorted(p.name for p in models.iterdir()) == ["tiny"]
    assert folder.stat().st_mode & 0o777 == 0o755
    # A class shrinks: its extra images, previews and probabilities go.
    _, cfg = write_config(cnn={"backend": "reference"}, preprocess={"shard_size": 2})
    run_pipeline(cfg, say=quiet)
    _, small = write_config(images_per_class=2, cnn={"backend": "reference"},
                            preprocess={"shard_size": 2})  # fmt: skip
    run_pipeline(small, say=quiet)
    root = small.data_root
    assert sorted(p.name for p in (root / "generated" / "cat").iterdir()) == [
        "cat-000000.png", "cat-000001.png"]  # fmt: skip
    assert len(list((root / "preprocessed/synthetic/previews").glob("*.png"))) == 4
    assert sorted(p.name for p in (root / "predictions/synthetic").glob("*.probs.npz")) == [
        "shard-00000.probs.npz", "shard-00001.probs.npz"]  # fmt: skip


def test_a_prompt_too_long_for_clip_is_said_once_and_recorded_as_read(write_config):
    long = "a photograph of a small grey cat sitting on a wooden chair in the afternoon sun"
    classes = [{"name": "cat", "prompts": [long]}, {"name": "dog", "prompts": ["a dog"]}]
    path, cfg = write_config(classes=classes)
    done = run_cli("generate", str(path))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "tokens, the model reads" in line]
    # Said once for the four images that share it, with what is cut: the end of the style.
    assert len(warnings) == 1 and "cut: 'o'" in warnings[0], warnings
    assert "The following part of your input was truncated" not in done.stderr
    cat = json.loads((cfg.data_root / "generated" / "manifest.jsonl").read_text().splitlines()[0])
    assert cat["prompt"] == f"{long}, studio photo"
    # The tiny test tokenizer reads one character a token, so the model reads 75 of 93.
    assert cat["model_prompt"].endswith("studio phot")


def test_timings_keep_the_result_and_the_last_run(write_config):
    _, cfg = write_config()
    generate.run(cfg, limit=3)
    generate.run(cfg)
    stage = json.loads((cfg.data_root / "generated" / "stage.json").read_text())
    assert stage["result_seconds"] > stage["seconds"] > 0
    generate.run(cfg)  # nothing to do: the result's cost is still there
    after = json.loads((cfg.data_root / "generated" / "stage.json").read_text())
    assert after["result_seconds"] >= stage["result_seconds"] and after["seconds"] < 1


def test_the_confusion_matrix_columns_line_up(write_config):
    _, cfg = write_config(cnn={"backend": "reference"})
    summaries = run_pipeline(cfg, say=quiet)
    lines = next(s for s in summaries if isinstance(s, classify.ClassifySummary)).lines()
    header = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    ends = [[m.end() for m in re.finditer(r"\S+", line)] for line in lines[header + 1 : header + 4]]
    # Each class name ends where the numbers of its column end, in every row.
    assert ends[0] == ends[1][1:] == ends[2][1:]


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    """ENOSPC from a write or fsync names no file: the error says which one it was."""
    from synthflux import storage

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", full)
    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as e:
        storage.write_json_atomic(target, {"a": 1})
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # nothing half-written left


def test_a_second_training_folder_never_replaces_the_first(tmp_path):
    from digits import digits_config, write_digits

    train_a, train_b = write_digits(tmp_path / "a")
    path, cfg = save_config(tmp_path / "d.toml", digits_config(tmp_path / "data"))
    assert run_cli("import", str(path), str(train_a), "--as", "train").returncode == 0
    manifest = (cfg.layout.source("train").manifest).read_bytes()
    done = run_cli("import", str(path), str(train_b), "--as", "train")
    assert done.returncode == 2 and f"source 'train' was imported from {train_a}" in done.stderr
    assert cfg.layout.source("train").manifest.read_bytes() == manifest
    assert (
        run_cli("import", str(path), str(train_b), "--as", "train", "--name", "more").returncode
        == 0
    )
