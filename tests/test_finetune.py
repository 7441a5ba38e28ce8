"""The finetune stage: the generator fitted to real images (scikit-learn's digits), a killed
fit resumed bit for bit, generate sampling the fitted model, a refit making everything after
it stale, the per-class LoRA on the tiny Stable Diffusion, and the errors a user can meet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from digits import keep_classes, write_digits
from PIL import Image

from conftest import REPO, deep_update, run_cli, run_until_held, save_config
from synthflux import finetune, fitted, generate, ingest, lineage, preprocess, sweep
from synthflux.config import PipelineConfig
from synthflux.errors import ConfigError, DataError
from synthflux.records import read_manifest
from synthflux.storage import ShardSpec

CLASSES = ["0", "1", "2"]

PIXEL: dict[str, Any] = {
    "seed": 3,
    "images_per_class": 4,
    "classes": [{"name": c} for c in CLASSES],
    "finetune": {
        "method": "pixel",
        "steps": 6,
        "batch_size": 8,
        "checkpoint_every": 2,
        "channels": 1,
        "block_out_channels": [8, 16],
    },
    "generate": {"steps": 3, "guidance_scale": 2.0, "width": 8, "height": 8, "batch_size": 3},
    "preprocess": {
        "width": 8,
        "height": 8,
        "channels": 1,
        "shard_size": 8,
        "resample": "bilinear",
        "aspect": "stretch",
    },
    "train": {"epochs": 1},
    "cnn": {"backend": "reference"},
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    train, test = write_digits(tmp_path_factory.mktemp("digits"), test_fraction=0.9)
    keep_classes((train, test), CLASSES)
    return train, test


def pixel_config(
    folder: Path, data: Path, train: Path | None, **over: Any
) -> tuple[Path, PipelineConfig]:
    """PIXEL with `over`, data root `data`; `train` imported as the real training source."""
    path, cfg = save_config(
        folder / "pipeline.toml", deep_update({**PIXEL, "data_root": str(data)}, over)
    )
    if train is not None:
        ingest.run(cfg, train, split="train")
    return path, cfg


def fitted_bytes(cfg: PipelineConfig) -> dict[str, bytes]:
    model = cfg.layout.fitted_model
    return {p.relative_to(model).as_posix(): p.read_bytes() for p in sorted(model.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_a_killed_fit_resumes_to_the_same_weights(tmp_path, digits) -> None:
    _, whole = pixel_config(tmp_path / "a", tmp_path / "a" / "data", digits[0])
    summary = finetune.run(whole)
    assert summary.complete and summary.fitted == ["pixel"] and summary.steps == 6
    assert lineage.is_current(whole, "finetune")
    path, cfg = pixel_config(tmp_path / "b", tmp_path / "b" / "data", digits[0])
    # Killed right after the checkpoint of step 4 (the second), then run again.
    proc = run_until_held(["finetune", str(path)], "fit-checkpoint:2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cfg.layout.fit_checkpoint("pixel").is_file()
    assert not lineage.is_current(cfg, "finetune")
    again = finetune.run(cfg)
    assert again.resumed_at == {"pixel": 4} and again.steps == 2
    assert fitted_bytes(cfg) == fitted_bytes(whole)  # bit for bit, on this CPU
    assert not cfg.layout.fit_checkpoint("pixel").exists()
    assert finetune.run(cfg).reused == ["pixel"]  # current: nothing fitted again


def test_a_task_that_fits_nothing_never_calls_an_old_fit_current(tmp_path, digits) -> None:
    _, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0])
    finetune.run(cfg)
    _, changed = pixel_config(tmp_path, tmp_path / "data", None, finetune={"steps": 4})
    other_task = finetune.run(changed, shard=ShardSpec(1, 2))  # the pixel fit is task 0's
    assert other_task.fitted == [] and not other_task.complete
    assert not lineage.is_current(changed, "finetune")


def test_a_damaged_checkpoint_is_said_and_the_fit_starts_afresh(tmp_path, digits, caplog) -> None:
    _, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0])
    checkpoint = cfg.layout.fit_checkpoint("pixel")
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    summary = finetune.run(cfg)
    assert summary.complete and summary.resumed_at == {} and summary.steps == 6
    assert "is damaged" in caplog.text
    assert checkpoint.with_name("pixel.pt.damaged").read_bytes() == b"not a checkpoint"


def test_generate_samples_the_fitted_model_by_class(tmp_path, digits) -> None:
    _, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0])
    finetune.run(cfg)
    summary = generate.run(cfg)
    assert summary.complete and summary.generated == 12
    records = read_manifest(cfg.layout)
    assert {r["model"] for r in records} == {"finetuned-pixel"}
    assert {r["model_revision"] for r in records} == {fitted.revision(cfg)}
    assert [r["prompt"] for r in records[:1]] == ["0"]  # no prompts: the class names it
    with Image.open(cfg.layout.image(records[0]["file"])) as im:
        assert (im.mode, im.size) == ("RGB", (8, 8))
        rgb = np.asarray(im)
    assert (rgb[..., 0] == rgb[..., 1]).all()  # a grayscale model: grey RGB
    # Sharded: the two halves are the same bytes as the whole.
    _, split = pixel_config(tmp_path / "split", tmp_path / "split" / "data", digits[0])
    finetune.run(split)
    for i in range(2):
        generate.run(split, shard=ShardSpec(i, 2))
    whole = {r["file"]: cfg.layout.image(r["file"]).read_bytes() for r in records}
    assert {f: split.layout.image(f).read_bytes() for f in whole} == whole


def test_a_refit_makes_generate_and_everything_after_it_stale(tmp_path, digits) -> None:
    _, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0])
    finetune.run(cfg)
    generate.run(cfg)
    preprocess.run(cfg)
    assert lineage.is_current(cfg, "generate") and lineage.is_current(cfg, "preprocess")
    _, refit = pixel_config(tmp_path, tmp_path / "data", None, finetune={"steps": 4})
    # A changed fit setting: generate is stale at once, before any refit.
    assert "generate" in (lineage.problem(refit, "generate") or "")
    with pytest.raises(DataError, match="generate"):
        preprocess.run(refit)
    with pytest.raises(DataError, match="finetune"):
        generate.run(refit)  # it will not sample a model fitted for other settings
    finetune.run(refit)
    again = generate.run(refit)
    assert again.reused == 0 and again.generated == 12  # every image made by the new model
    assert preprocess.run(refit).complete


@pytest.mark.parametrize(
    ("over", "train", "message"),
    [
        ({}, None, "no source of that name was imported: run `synthflux import"),
        ({"finetune": {"source": "held"}}, "test-as-held", "is a test set"),
        ({}, "one-class", "has no images of class '1'"),
    ],
)
def test_what_a_fit_cannot_use_is_one_line(tmp_path, digits, over, train, message) -> None:
    path, cfg = pixel_config(tmp_path, tmp_path / "data", None, **over)
    if train == "test-as-held":
        ingest.run(cfg, digits[1], split="test", name="held")
    elif train == "one-class":
        only = tmp_path / "only"
        (only / "0").mkdir(parents=True)
        for png in sorted((digits[0] / "0").glob("*.png"))[:3]:
            (only / "0" / png.name).write_bytes(png.read_bytes())
        ingest.run(cfg, only, split="train", classes_subset=True)
    result = run_cli("finetune", str(path))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr
    assert not cfg.layout.fitted_model.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"finetune": {"block_out_channels": [8, 16, 24, 32, 40]}}, "at most 4"),
        ({"generate": {"init_source": "train"}}, "cannot be combined with [finetune]"),
        ({"finetune": {"block_out_channels": [12, 16]}}, "multiple of 8"),
        ({"finetune": {"method": "gan"}}, "finetune.method"),
    ],
)
def test_bad_finetune_settings_name_the_field(tmp_path, over, message) -> None:
    with pytest.raises(ConfigError) as e:
        pixel_config(tmp_path, tmp_path / "data", None, **over)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_status_and_run_know_the_stage_from_the_contract(tmp_path, digits) -> None:
    path, _ = pixel_config(tmp_path, tmp_path / "data", digits[0])
    status = run_cli("status", str(path))
    assert status.returncode == 0, status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line[:1] != " "}
    assert list(lines)[:2] == ["finetune", "generate"], status.stdout  # generate samples the fit
    assert "incomplete 0/1 tasks done" in lines["finetune"]
    assert "waiting for the stage before it" in lines["generate"]
    ran = run_cli("run", str(path))
    assert ran.returncode == 0, ran.stderr
    assert "finetune: pixel: fitted" in ran.stdout
    assert "finetune: the fitted generator are complete" not in ran.stdout
    again = run_cli("run", str(path))
    assert "finetune: already fitted and current: pixel" in again.stdout
    dry = run_cli("submit", str(path), "--shards", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "finetune" in dry.stdout


def test_interrupted_lora_fit_per_class_shards(tmp_path, tiny_model, digits) -> None:
    """LoRA on the tiny Stable Diffusion: each --shard fits its classes; generate loads every
    class's adapter and makes each class's batches with its own (the images equal a plain run
    with that class's adapter as generate.lora)."""
    raw = {
        "data_root": str(tmp_path / "data"), "seed": 5, "images_per_class": 2,
        "classes": [{"name": c, "prompts": [f"a handwritten digit {c}"]} for c in CLASSES[:2]],
        "finetune": {"method": "lora", "steps": 3, "batch_size": 2, "lr": 0.05, "rank": 2,
                     "checkpoint_every": 1},
        "generate": {"model": str(tiny_model), "steps": 2, "width": 32, "height": 32,
                     "batch_size": 2, "guidance_scale": 2.0},
    }  # fmt: skip
    path, cfg = save_config(tmp_path / "lora.toml", raw)
    keep = tmp_path / "two"
    for c in CLASSES[:2]:
        (keep / c).mkdir(parents=True)
        for png in sorted((digits[0] / c).glob("*.png"))[:4]:
            (keep / c / png.name).write_bytes(png.read_bytes())
    ingest.run(cfg, keep, split="train")
    first = finetune.run(cfg, shard=ShardSpec(0, 2))
    assert first.fitted == ["0"] and not first.complete
    assert not cfg.layout.fitted_classes.exists()
    with pytest.raises(DataError, match="finetune is incomplete|not found"):
        generate.run(cfg)
    proc = run_until_held(["finetune", str(path), "--shard", "1/2"], "fit-checkpoint:2")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    second = finetune.run(cfg, shard=ShardSpec(1, 2))
    assert second.fitted == ["1"] and second.resumed_at == {"1": 2} and second.complete
    for c in CLASSES[:2]:
        assert (cfg.layout.fitted_model / c / "pytorch_lora_weights.safetensors").is_file()
    # [generate] devices: one worker per device fits its classes; the same bytes
    spread = deep_update(raw, {"data_root": str(tmp_path / "spread"),
                               "generate": {"devices": ["cpu", "cpu"]}})  # fmt: skip
    _, both = save_config(tmp_path / "spread.toml", spread)
    ingest.run(both, keep, split="train")
    on_two = finetune.run(both)
    assert on_two.fitted == ["0", "1"] and on_two.complete and on_two.steps == 6
    for c in CLASSES[:2]:
        weights = f"{c}/pytorch_lora_weights.safetensors"
        assert (both.layout.fitted_model / weights).read_bytes() == (
            cfg.layout.fitted_model / weights
        ).read_bytes()
    made = generate.run(cfg)
    assert made.complete
    records = read_manifest(cfg.layout)
    assert all(any(a.startswith("finetuned-lora:") for a in r["adapters"]) for r in records)
    for c in CLASSES[:2]:  # class c's images are those of its adapter alone
        plain = deep_update(raw, {"data_root": str(tmp_path / f"plain{c}"),
                                  "generate": {"lora": [str(cfg.layout.fitted_model / c)]}})  # fmt: skip
        del plain["finetune"]
        _, alone = save_config(tmp_path / f"plain{c}.toml", plain)
        generate.run(alone)
        for r in records:
            if r["class"] == c:
                assert alone.layout.image(r["file"]).read_bytes() != b""
                mine = np.asarray(Image.open(cfg.layout.image(r["file"])))
                theirs = np.asarray(Image.open(alone.layout.image(r["file"])))
                assert np.array_equal(mine, theirs), r["file"]
    base = deep_update(raw, {"data_root": str(tmp_path / "base")})
    del base["finetune"]
    _, untouched = save_config(tmp_path / "base.toml", base)
    generate.run(untouched)
    r = records[0]
    assert not np.array_equal(np.asarray(Image.open(cfg.layout.image(r["file"]))),
                              np.asarray(Image.open(untouched.layout.image(r["file"]))))  # fmt: skip


# --- the demo, the sweep and the report over a fitted generator ----------------------------------


def demo_config(tmp_path: Path, **over: Any) -> Path:
    """examples/digits.toml (the demo's) at toy size: a short fit, few images, few epochs."""
    from synthflux.config import read_toml

    raw = read_toml(REPO / "examples" / "digits.toml")
    raw = deep_update(raw, {"data_root": str(tmp_path / "demo"), "images_per_class": 6,
                            "finetune": {"steps": 8, "block_out_channels": [8, 16]},
                            "generate": {"steps": 3}, "train": {"epochs": 2}})  # fmt: skip
    raw = deep_update(raw, over)
    path, _ = save_config(tmp_path / "digits.toml", raw)
    return path


def test_the_demo_at_toy_size_reports_the_test_accuracy_by_name_beside_the_baseline(
    tmp_path,
) -> None:
    path = demo_config(tmp_path)
    steps = [["digits", str(tmp_path / "digits")],
             ["import", str(path), str(tmp_path / "digits" / "train"), "--as", "train"],
             ["import", str(path), str(tmp_path / "digits" / "test"), "--as", "test"],
             ["run", str(path)]]  # fmt: skip
    for args in steps:  # what `make demo` runs
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
    assert "finetune: pixel: fitted" in done.stdout
    assert "evaluate: real-only baseline (train; 899 images): test accuracy" in done.stdout
    root = tmp_path / "demo"
    summary = json.loads((root / "evaluation" / "summary.json").read_text())
    assert summary["trained_on"] == ["synthetic"]
    d = summary["distribution"]  # the real training images, though not trained on: the reference
    assert [(c["train"], c["test"]) for c in d["comparisons"]] == [
        ("synthetic", "test"),
        ("train", "test"),
    ]
    assert d["reference"] == "train" and "x the real training images' (train vs test" in done.stdout
    base = summary["baseline"]["tests"]["test"]
    assert base["images"] == 898 and base["accuracy"] > 0.5  # real digits teach, even in 2 epochs
    page = (root / "report" / "index.html").read_text()
    headline = page[page.index('<p id="headline">') :].split("</p>")[0]
    test_acc = summary["splits"]["test"]["accuracy"]
    assert "real test set <b>test</b> (898 images)" in headline
    assert "1x is as close as real" in page
    assert f"{test_acc:.3f}" in headline and f"{base['accuracy']:.3f}" in headline
    with Image.open(root / "report" / "real-and-generated.png") as im:
        assert im.width > 400 and im.height > 300  # a row per class, real and generated


def test_a_sweep_fits_the_generator_once_and_its_points_share_it(tmp_path, digits) -> None:
    path, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0],
                             sweep={"images": [3, 6], "sources": ["synthetic", "real"]})  # fmt: skip
    ingest.run(cfg, digits[1], split="test")
    said: list[str] = []
    rows = sweep.run(path, say=said.append)
    assert rows is not None and [r["point"] for r in rows] == [
        "synthetic-n3",
        "synthetic-n6",
        "real",
    ]
    fits = [line for line in said if "finetune" in line or "sweep fit" in line]
    assert sum("pixel: fitted" in line for line in fits) == 1, said  # once, not per point
    points = sorted((tmp_path / "data" / "sweep" / "points").iterdir())
    for point in points:
        if point.name.startswith("synthetic"):
            assert (point / "finetuned").is_symlink()
            assert (
                json.loads((point / "evaluation" / "summary.json").read_text())["baseline"] is None
            )
    again: list[str] = []
    assert sweep.run(path, say=again.append) == rows  # resumed: nothing refitted or redone
    assert not any("fitted," in line for line in again)


def test_a_sweep_takes_the_fit_run_made_in_its_data_root(tmp_path, digits) -> None:
    path, cfg = pixel_config(tmp_path, tmp_path / "data", digits[0],
                             sweep={"images": [3], "sources": ["synthetic"]})  # fmt: skip
    ingest.run(cfg, digits[1], split="test")
    finetune.run(cfg)  # as `synthflux run` (make demo) fits it
    said: list[str] = []
    assert sweep.run(path, say=said.append) is not None
    assert not any("fitted," in line for line in said), said  # hard-linked, not fitted again
    weights = "finetuned/model/unet/diffusion_pytorch_model.safetensors"
    shared = next((tmp_path / "data" / "sweep").glob("images-*")) / weights
    assert shared.stat().st_ino == (tmp_path / "data" / weights).stat().st_ino


@pytest.mark.parametrize(
    ("test_acc", "base", "chance"),
    [(0.934, 0.957, False), (0.11, 0.9, True), (None, None, False)],
)
def test_the_headline_names_the_test_set_the_baseline_and_chance(test_acc, base, chance) -> None:
    from synthflux.headline import sentences

    classes = [str(d) for d in range(10)]
    split = {"kind": "test", "images": 898, "accuracy": test_acc, "sources": ["test"]}
    evaluation = {"splits": {"held-out": split, "validation": {**split, "kind": "validation",
                  "images": 87, "accuracy": 0.95, "sources": ["synthetic"]}},
                  "trained_on": ["synthetic"]}  # fmt: skip
    if base is not None:
        evaluation["baseline"] = {"images": 899, "tests": {"held-out": {**split, "accuracy": base}}}
    text = " ".join(sentences(evaluation, classes))
    assert "real test set <b>held-out</b> (898 images)" in text
    assert ("n/a" if test_acc is None else f"{test_acc:.3f}") in text
    assert base is None or f"against <b>{base:.3f}</b>" in text
    assert ("trained on the real training images alone" in text) == (base is not None)
    assert ("no better than chance" in text) == chance
    assert "Validation accuracy (held-out synthetic images, 87): 0.950" in text
    assert "No real test set" in " ".join(sentences({"splits": {}}, classes))


def test_the_gpu_bench_runs_at_toy_size_on_a_cpu() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--toy"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "device: CPU; model: tiny, 32x32" in done.stdout
    ratio = float(done.stdout.split("overhead ratio (synthflux / bare): ")[1].split()[0])
    assert ratio > 0
    assert "LoRA fit (2 classes, batch 2, rank 4): 8 steps in" in done.stdout


@pytest.mark.slow
def test_the_cas_bench_runs_quick() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "digits_cas.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["89.9", "20.0"]
    assert all(0 <= float(v) <= 1 for r in rows for v in r[2:5])


def test_finetune_without_its_section_is_one_line(write_config) -> None:
    path, _ = write_config()
    done = run_cli("finetune", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        == "synthflux finetune: error: the config has no [finetune] section: nothing to fit"
    )
