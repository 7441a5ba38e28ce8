"""train and evaluate: the rules both languages follow, the PyTorch twin against the golden
training case, real digits learned and tested, resume, and the three user stories."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from digits import CLASSES as DIGITS
from digits import digits_config, write_digits

from conftest import REPO, run_cli, run_until_held, save_config
from synthflux import classify, evaluate, ingest, lineage, reference_train, train
from synthflux.errors import ClassifyError, DataError
from synthflux.pipeline import run_pipeline
from synthflux.status import pipeline_status
from synthflux.trainplan import augment, augmentation, is_validation, unit_hash

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "train"


def quiet(_: str) -> None:
    pass


# --- the language-neutral rules (docs/training.md) ------------------------------------------


def test_unit_hash_and_the_split_rule():
    # The same vectors julia/test/runtests.jl checks.
    assert unit_hash(0, "split", "synthetic", 5) == 5372812218141759764
    assert unit_hash(7, "order", 3, "real-train", 1000002) == 18302822084227979998
    assert unit_hash(123, "shard", 1, "synthetic", "shard-00002.npz") == 12758308679136725817
    assert unit_hash(7, "augment", 2, "digits", 4611686018427387904) == 16321656232220981730
    assert (5372812218141759764 >> 11) / 2**53 == 0.2912607339632979
    assert is_validation(0, "synthetic", 5, 0.3) and not is_validation(0, "synthetic", 5, 0.29)
    held = [is_validation(1, "s", i, 0.25) for i in range(4000)]
    assert abs(sum(held) / 4000 - 0.25) < 0.03


def test_augmentation_flips_then_shifts_with_the_edges_repeated():
    chw = np.arange(12, dtype=np.float32).reshape(1, 3, 4)  # rows y, columns x
    assert np.array_equal(augment(chw, True, 0, 0)[0, 0], [3, 2, 1, 0])
    shifted = augment(chw, False, 1, -1)  # one column right, one row up
    assert np.array_equal(shifted[0], [[4, 4, 5, 6], [8, 8, 9, 10], [8, 8, 9, 10]])
    # out[x] = in[clamp(fx - dx)], fx = W-1-x: the shift is taken before the mirror.
    assert np.array_equal(augment(chw, True, 1, 0)[0, 0], [2, 1, 0, 0])
    seen = {augmentation(3, 1, "s", i, True, 2) for i in range(200)}
    assert {f for f, _, _ in seen} == {False, True}
    assert {dx for _, dx, _ in seen} == {-2, -1, 0, 1, 2} == {dy for _, _, dy in seen}
    assert augmentation(3, 1, "s", 7, False, 0) == (False, 0, 0)


def test_adamw_is_the_documented_formula():
    import torch

    settings = reference_train.Settings(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6,
                                        weight_decay=0.1)  # fmt: skip
    p = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    opt = reference_train.AdamW(settings, {"w": p})
    want, m, v = (
        p.detach().numpy().astype(np.float32),
        np.zeros(3, np.float32),
        np.zeros(3, np.float32),
    )
    f = np.float32
    for t, g in enumerate(([0.1, -0.2, 0.3], [0.05, 0.0, -0.4]), 1):
        p.grad = torch.tensor(g)
        opt.update()
        g = np.array(g, np.float32)
        m = f(0.8) * m + f(1 - 0.8) * g
        v = f(0.95) * v + f(1 - 0.95) * (g * g)
        want = want * f(1 - 0.01 * 0.1)
        want = want - f(0.01 / (1 - 0.8**t)) * m / (
            np.sqrt(v) / f(math.sqrt(1 - 0.95**t)) + f(1e-6)
        )
        assert np.array_equal(p.detach().numpy(), want)


def test_the_twin_reproduces_the_golden_training(tmp_path, monkeypatch):
    """Each step's loss and the weights after the last one (tests/fixtures/golden/train)."""
    expected = np.load(GOLDEN / "expected.npz")
    losses: list[float] = []
    real_step = reference_train._step

    def recorded(model, opt, x, y):
        loss_sum, right = real_step(model, opt, x, y)
        losses.append(loss_sum / len(y))
        return loss_sum, right

    monkeypatch.setattr(reference_train, "_step", recorded)
    args = (GOLDEN / "args.txt").read_text().split()
    reference_train.main(["--input", f"golden={GOLDEN / 'data'}", "--weights",
                          str(GOLDEN / "init.npz"), "--output", str(tmp_path), *args],
                         lambda line: True)  # fmt: skip
    np.testing.assert_allclose(losses, expected["step_loss"], rtol=1e-6)
    with np.load(tmp_path / "checkpoint.npz") as ck:
        for name in (
            k.removeprefix("weights_") for k in expected.files if k.startswith("weights_")
        ):
            want = expected[f"weights_{name}"]
            assert np.abs(ck[name] - want).max() <= 1e-6 * np.abs(want).max(), name
        np.testing.assert_allclose(ck["history"][:, :6], expected["history"], rtol=1e-6)
    assert len(losses) == 6  # 12 training images, batches of 4, 2 epochs


def golden_run(out: Path, *overrides: str) -> list[str]:
    """The golden case's run with some settings changed; the lines it printed."""
    lines: list[str] = []
    args = [*(GOLDEN / "args.txt").read_text().split(), *overrides]
    reference_train.main(["--input", f"golden={GOLDEN / 'data'}", "--weights",
                          str(GOLDEN / "init.npz"), "--output", str(out), *args],
                         lambda line: lines.append(line) is None)  # fmt: skip
    return lines


def test_the_stopping_rule_is_asked_afresh_on_every_start(tmp_path):
    """More epochs go on from a finished run, to the weights of one long run; a checkpoint past
    --epochs is refused; metrics.jsonl holds the printed metrics lines, in train.jl's format."""
    golden_run(tmp_path / "long", "--epochs", "3")
    golden_run(tmp_path / "grown", "--epochs", "2")
    lines = golden_run(tmp_path / "grown", "--epochs", "3")
    assert lines[0] == "resume: from epoch 2"
    assert lines[-1].startswith("done: stopped after 3 epochs; best epoch ")
    assert (tmp_path / "grown" / "weights.npz").read_bytes() == (
        tmp_path / "long" / "weights.npz"
    ).read_bytes()
    printed = [line.removeprefix("metrics: ") for line in lines if line.startswith("metrics: ")]
    written = (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()
    assert written[2:] == printed and len(written) == 3
    first = json.loads(written[0])
    assert list(first) == ["epoch", "steps", "train_loss", "train_accuracy", "val_loss",
                           "val_accuracy", "images_per_s", "seconds", "best_epoch"]  # fmt: skip
    assert first["epoch"] == 1 and first["steps"] == 3
    with pytest.raises(DataError, match="past --epochs 2"):
        golden_run(tmp_path / "long", "--epochs", "2")


def test_the_best_epoch_and_early_stopping():
    """Lowest val_loss, the first on ties, NaN never better than a number; without validation
    the last epoch; patience counts the epochs since the best."""
    nb, nan = reference_train.next_best, math.nan
    assert nb(0, nan, 1, 0.5, True) == (1, 0.5)
    assert nb(1, 0.5, 2, 0.5, True) == (1, 0.5)  # a tie keeps the first
    assert nb(1, 0.5, 2, 0.4, True) == (2, 0.4)
    assert nb(1, 0.5, 2, nan, True) == (1, 0.5)  # diverged: not an improvement
    assert nb(0, nan, 1, nan, True)[0] == 1 and nb(1, nan, 2, 0.9, True) == (2, 0.9)
    assert nb(3, nan, 4, nan, False)[0] == 4
    history = [[e, e, 1.0, 0.5, loss, 0.5, 1.0, 1.0] for e, loss in enumerate([3, 2, 2, 5], 1)]
    assert reference_train.best_epochs(history) == [1, 2, 2, 2]
    settings = reference_train.Settings(epochs=10, patience=2)
    state = reference_train._State(epoch=4, best_epoch=2, bad_epochs=2)
    assert reference_train.stop_now(state, settings)
    assert not reference_train.stop_now(state, reference_train.Settings(epochs=10, patience=0))


# --- real images: train on real, test on real ---------------------------------------------


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"))


def digits(tmp_path: Path, folders: tuple[Path, Path], **train_settings):
    path, cfg = save_config(tmp_path / "digits.toml", digits_config(tmp_path / "data",
                                                                   **train_settings))  # fmt: skip
    ingest.run(cfg, folders[0], split="train")
    ingest.run(cfg, folders[1], split="test")
    return path, cfg


@pytest.mark.slow
def test_real_digits_are_learned_and_tested(tmp_path, digit_folders):
    """sklearn's 1,797 real digits: 80 % imported to train, 20 % to test, 16x16 gray."""
    path, cfg = digits(tmp_path, digit_folders)
    start = time.monotonic()
    summaries = run_pipeline(cfg, say=quiet)
    seconds = time.monotonic() - start
    assert "generate" not in [type(s).__name__.lower() for s in summaries]  # real only
    test = json.loads((cfg.data_root / "evaluation" / "summary.json").read_text())["splits"]["test"]
    assert test["images"] == 359 and test["accuracy"] >= 0.95, test["accuracy"]
    assert test["macro"]["f1"] >= 0.95 and set(test["per_class"]) == set(DIGITS)
    assert seconds < 120, seconds
    status = pipeline_status(cfg, 1)
    assert status.complete and not status.stages["generate"].needed
    report = run_cli("report", str(path))
    assert report.returncode == 0, report.stderr
    page = (cfg.data_root / "report" / "index.html").read_text()
    assert 'alt="test"' in page and 'alt="learning curves"' in page
    assert page.count('<figure class="wrong">') >= 1  # the test images it got wrong, shown


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_weights(tmp_path, digit_folders):
    settings = {"epochs": 4, "patience": 0}
    _, whole = digits(tmp_path / "whole", digit_folders, **settings)
    run_pipeline(whole, say=quiet)
    path, cfg = digits(tmp_path / "killed", digit_folders, **settings)
    assert run_cli("preprocess", str(path)).returncode == 0
    proc = run_until_held(["train", str(path)], hold="epoch:2")
    proc.kill()
    proc.wait()
    metrics = cfg.data_root / "training" / "run" / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 2  # killed after its second checkpoint
    done = run_cli("train", str(path))
    assert done.returncode == 0, done.stderr
    assert "resume: from epoch 2" in done.stderr
    weights = "model/weights.npz"
    assert (cfg.data_root / weights).read_bytes() == (whole.data_root / weights).read_bytes()
    assert len(metrics.read_text().splitlines()) == 4


@pytest.mark.slow
def test_training_memory_does_not_grow_with_the_dataset(tmp_path):
    """The trainer holds one shard and one batch: 600 vs 4,800 images, peak RSS within 20 %."""
    peaks = []
    for n in (600, 4800):
        root = tmp_path / str(n)
        folder = root / "folder"
        rng = np.random.default_rng(n)
        for c in ("a", "b"):
            (folder / c).mkdir(parents=True)
        from PIL import Image

        for i in range(n):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / "ab"[i % 2] / f"{i}.png")
        raw = {"data_root": str(root / "data"), "classes": [{"name": "a"}, {"name": "b"}],
               "preprocess": {"width": 16, "height": 16, "shard_size": 300},
               "train": {"sources": ["real"], "epochs": 1}, "cnn": {"backend": "reference"}}  # fmt: skip
        path, cfg = save_config(root / "m.toml", raw)
        ingest.run(cfg, folder, split="train")
        assert run_cli("preprocess", str(path)).returncode == 0
        proc = subprocess.Popen([sys.executable, "-m", "synthflux", "train",
                                 str(path)], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        assert proc.returncode == 0
        peaks.append(peak)
    assert peaks[1] / peaks[0] <= 1.2, peaks


# --- the user stories, on the tiny synthetic images -----------------------------------------


def real_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    return root


def test_train_on_synthetic_and_test_on_real(write_config, tmp_path):
    """Story 1: a held-out part of the synthetic images, and a folder of real ones."""
    _, cfg = write_config(cnn={"backend": "reference"}, train={"epochs": 2, "val_fraction": 0.25})
    ingest.run(cfg, real_folder(tmp_path / "photos"), split="test", name="photos")
    summaries = run_pipeline(cfg, say=quiet)
    result = json.loads((cfg.data_root / "evaluation" / "summary.json").read_text())
    splits = result["splits"]
    assert set(splits) == {"validation", "train", "photos"}
    assert splits["validation"]["images"] + splits["train"]["images"] == 8
    assert splits["photos"]["images"] == 12 and splits["photos"]["kind"] == "test"
    assert result["trained_on"] == ["synthetic"]
    assert [type(s).__name__ for s in summaries[-2:]] == ["EvaluateSummary", "ReportSummary"]
    rows = (cfg.data_root / "evaluation" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("split,source,id") and len(rows) == 1 + 8 + 12


def test_train_on_real_and_synthetic_together(write_config, tmp_path):
    """Story 2: the real training folder and the synthetic images, in one training."""
    _, cfg = write_config(cnn={"backend": "reference"},
                          train={"sources": ["synthetic", "real"], "epochs": 1})  # fmt: skip
    ingest.run(cfg, real_folder(tmp_path / "photos"), split="train")
    run_pipeline(cfg, say=quiet)
    metrics = (cfg.data_root / "training" / "run" / "metrics.jsonl").read_text().splitlines()
    steps = json.loads(metrics[0])["steps"]
    result = json.loads((cfg.data_root / "evaluation" / "summary.json").read_text())
    trained = result["splits"]["train"]
    assert result["trained_on"] == ["synthetic", "train"] and set(trained["sources"]) == {
        "synthetic", "train"}  # fmt: skip
    assert steps == -(-trained["images"] // 32)  # one epoch over every training image


def test_train_on_real_only_needs_no_prompts_and_no_generation(tmp_path):
    """Story 3: the baseline without synthetic images."""
    raw = {"data_root": str(tmp_path / "data"), "classes": [{"name": "cat"}, {"name": "dog"}],
           "preprocess": {"width": 16, "height": 16}, "train": {"sources": ["real"], "epochs": 1},
           "cnn": {"backend": "reference"}}  # fmt: skip
    path, cfg = save_config(tmp_path / "real.toml", raw)
    ingest.run(cfg, real_folder(tmp_path / "photos"), split="train")
    done = run_cli("run", str(path))
    assert done.returncode == 0, done.stderr
    assert "generate:" not in done.stdout and "train: trained on train" in done.stdout
    assert not (cfg.data_root / "generated").exists()
    assert "not needed by this config" in run_cli("status", str(path)).stdout


def test_clear_errors_before_training_or_evaluating(write_config, tmp_path):
    path, cfg = write_config(cnn={"backend": "reference"}, train={"val_fraction": 0.0})
    done = run_cli("evaluate", str(path))
    assert (done.returncode == 2 and "preprocess" in done.stderr) or "generate" in done.stderr
    with pytest.raises(DataError, match='"real" but no folder was imported'):
        _, real = write_config(train={"sources": ["synthetic", "real"]})
        train.run(real)
    run_pipeline(write_config(cnn={"backend": "reference"})[1], say=quiet)
    (cfg.data_root / "model" / "weights.npz").unlink()
    with pytest.raises(ClassifyError, match="no trained model"):
        evaluate.run(cfg)
    train.run(cfg)
    classify.run(cfg)  # evaluate reads current predictions (`synthflux run` makes them)
    # No validation images and no test set: said, loudly, not hidden.
    notes = evaluate.run(cfg).notes
    assert any("no test set" in n for n in notes) and any(
        "no validation images" in n for n in notes
    )


def test_the_trainer_runs_through_the_local_backend_and_resumes(
    write_config, tmp_path, monkeypatch
):
    """The driver's contract with `flux_model.jl train`, against the stand-in."""
    from classify_data import fake_julia

    exe, jdir = fake_julia(tmp_path)
    monkeypatch.setenv("SYNTHFLUX_JULIA_DIR", str(jdir))
    path, cfg = write_config(cnn={"backend": "local", "julia": str(exe)}, train={"epochs": 3})
    assert run_cli("generate", str(path)).returncode == 0
    assert run_cli("preprocess", str(path)).returncode == 0
    control = cfg.data_root / "preprocessed" / "synthetic" / "standin-control.json"
    control.write_text(json.dumps({"fail_epoch": 2}))
    done = run_cli("train", str(path))
    assert done.returncode == 2 and "julia exited with code 3" in done.stderr
    error = next(line for line in done.stderr.splitlines() if "error:" in line)
    assert "flux_model: error:" in error and "simulated failure in epoch 2" in error
    assert not (cfg.data_root / "model" / "weights.npz").exists()
    control.unlink()
    done = run_cli("train", str(path))
    assert done.returncode == 0, done.stderr
    assert "julia | resume: from epoch 1" in done.stderr  # the checkpoint was kept
    assert "train: epoch 3: train loss" in done.stderr and "progress:" not in done.stderr
    assert (cfg.data_root / "model" / "weights.npz").is_file()
    assert pipeline_status(cfg, 1).stages["train"].complete


@pytest.mark.slow
def test_the_published_model_is_the_best_epochs(tmp_path, digit_folders):
    """model/weights.npz has the validation loss train reported for its best epoch (with early
    stopping, a later epoch's biases once leaked into it), recomputed with the twin."""
    from synthflux import reference
    from synthflux.reference_data import read_shards
    from synthflux.weights import load_weights

    _, cfg = digits(tmp_path, digit_folders, epochs=8, lr=0.003, patience=0)
    run_pipeline(cfg, say=quiet)
    rows = [json.loads(line) for line in cfg.layout.metrics.read_text().splitlines()]
    best = rows[-1]["best_epoch"]
    assert best < len(rows), "the case needs a best epoch before the last"
    reported = rows[best - 1]["val_loss"]
    weights = load_weights(cfg.layout.default_weights)
    model = reference.build_model(weights).eval()
    settings = reference_train.Settings(seed=cfg.train.seed, val_fraction=cfg.train.val_fraction)
    shards = read_shards([("train", cfg.layout.prepared("train").folder)], settings, 10)
    loss, _ = reference_train._validate(model, shards, cfg.train.batch_size)
    assert loss == pytest.approx(reported, rel=1e-6), (loss, reported)


def test_the_kept_best_weights_are_copies():
    """A snapshot of the parameters does not change when training goes on."""
    import torch

    params = {"conv1_bias": torch.nn.Parameter(torch.zeros(4)),
              "conv1_weight": torch.nn.Parameter(torch.zeros(4, 1, 3, 3)),
              "dense_weight": torch.nn.Parameter(torch.zeros(10, 4)),
              "dense_bias": torch.nn.Parameter(torch.zeros(10))}  # fmt: skip
    snapshot = reference_train._flux_weights(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    assert all(not a.any() for a in snapshot.values())


@pytest.mark.slow
def test_reordered_or_renamed_classes_never_relabel_images(tmp_path, digit_folders):
    """Reversing [[classes]] after a complete run: preprocess is no longer current, the run
    redoes it, and every image keeps its class by name. Renaming one: a one-line error."""
    import csv

    import tomllib

    from synthflux.config import load_config

    path, cfg = digits(tmp_path, digit_folders, epochs=2)
    run_pipeline(cfg, say=quiet)
    raw = tomllib.loads(path.read_text())
    raw["classes"].reverse()
    _, reordered = save_config(path, raw)
    status = pipeline_status(reordered, 1)
    assert not status.stages["preprocess"].complete and not status.complete
    run_pipeline(reordered, say=quiet)
    with open(reordered.layout.predictions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["class"] == r["file"].split("/")[0] for r in rows)
    assert all(int(r["label"]) == reordered.class_names.index(r["class"]) for r in rows)
    test = json.loads(reordered.layout.evaluation_summary.read_text())["splits"]["test"]
    assert test["accuracy"] >= 0.8, test["accuracy"]
    raw["classes"][0]["name"] = "nine"
    save_config(path, raw)
    done = run_cli("run", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is of class '9', which is not one of the config's classes" in done.stderr
    assert load_config(path).class_names[0] == "nine"


@pytest.mark.slow
def test_changed_split_settings_are_never_scored_as_current(tmp_path, digit_folders):
    """After val_fraction or the train seed changes, evaluate refuses (the model learned the
    images the new split would call validation) and status calls train incomplete."""
    import tomllib

    path, cfg = digits(tmp_path, digit_folders, epochs=2)
    run_pipeline(cfg, say=quiet)
    raw = tomllib.loads(path.read_text())
    for change in ({"val_fraction": 0.4}, {"seed": 7}):
        _, changed = save_config(path, {**raw, "train": {**raw["train"], **change}})
        done = run_cli("evaluate", str(path))
        assert done.returncode == 2, (change, done.stdout)
        assert "run `synthflux train`" in done.stderr and "Traceback" not in done.stderr
        status = pipeline_status(changed, 1)
        assert not status.stages["train"].complete and not status.stages["evaluate"].complete


def test_weights_replaced_while_classifying_publish_nothing(write_config, monkeypatch):
    """train publishing new weights while classify runs: classify keyed the old ones before it
    started, sees the change, publishes nothing and stays not current."""
    from synthflux.backends.reference import Reference

    _, cfg = write_config(cnn={"backend": "reference"})
    run_pipeline(cfg, say=quiet)
    before = cfg.layout.predictions_csv.read_bytes()
    weights = cfg.layout.default_weights
    original = Reference.classify

    def classify_then_retrain(self, job):
        original(self, job)
        from synthflux.weights import load_weights, save_weights

        new = load_weights(weights)
        save_weights(weights, {k: (a if k == "arch" else a + 1) for k, a in new.items()})

    monkeypatch.setattr(Reference, "classify", classify_then_retrain)
    (cfg.layout.predictions / "stage.json").unlink()  # classify must run again
    with pytest.raises(ClassifyError, match="changed while classifying"):
        classify.run(cfg)
    assert cfg.layout.predictions_csv.read_bytes() == before
    assert not lineage.is_current(cfg, "classify")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "no history"])
def test_a_damaged_checkpoint_is_said_kept_aside_and_training_starts_afresh(write_config, damage):
    import zipfile

    path, cfg = write_config(cnn={"backend": "reference"}, train={"epochs": 3, "patience": 0})
    assert run_cli("run", str(path)).returncode == 0
    weights = cfg.layout.default_weights.read_bytes()
    ckpt = cfg.layout.trainer_output("checkpoint.npz")
    good = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint" * 100)
    else:
        with zipfile.ZipFile(ckpt, "w") as z, zipfile.ZipFile(__import__("io").BytesIO(good)) as g:
            for name in g.namelist():
                if name != "history.npy":
                    z.writestr(name, g.read(name))
    damaged = ckpt.read_bytes()
    (cfg.layout.training / "stage.json").unlink()  # train must run again
    done = run_cli("train", str(path))
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "checkpoint.npz is damaged" in line]
    assert len(said) == 1 and "training starts afresh" in said[0], done.stderr
    assert "Traceback" not in done.stderr
    assert ckpt.with_name("checkpoint.npz.damaged").read_bytes() == damaged  # nothing lost
    assert cfg.layout.default_weights.read_bytes() == weights  # afresh = the same training


@pytest.mark.slow
def test_overlapping_or_empty_test_sets_are_said_loudly(tmp_path, digit_folders):
    """Training images imported as a test set too: evaluate and the report warn, with the
    count per class. A test set whose every image was rejected: said, not dropped silently."""
    _, cfg = digits(tmp_path, digit_folders, epochs=1)
    ingest.run(cfg, digit_folders[0], split="test", name="same")
    broken = tmp_path / "broken" / "3"
    broken.mkdir(parents=True)
    (broken / "a.png").write_bytes(b"not a png")
    ingest.run(cfg, broken.parent, split="test", name="broken", classes_subset=True)
    run_pipeline(cfg, say=quiet)
    notes = json.loads(cfg.layout.evaluation_summary.read_text())["notes"]
    same = [n for n in notes if "test set 'same' are byte-identical to training images" in n]
    per_class = {c: len(list((digit_folders[0] / c).iterdir())) for c in DIGITS}
    n = sum(per_class.values())
    assert len(same) == 1 and same[0].startswith(f"WARNING: {n} of {n} images"), notes
    assert f"(per class: {per_class})" in same[0]
    assert not any("test set 'test'" in n for n in notes)  # the real split shares nothing
    assert any("test set 'broken' has no image to score" in n for n in notes), notes
    page = cfg.layout.report.joinpath("index.html").read_text()
    assert "byte-identical to training images" in page and "has no image to score" in page
