"""Distribution metrics (synthflux.distribution) on known feature sets, and evaluate's
"distribution" section end to end on the tiny model with real digits as the real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthflux import distribution, evaluate, ingest
from synthflux.distribution import compare, duplicate_rates, frechet_distance, kid, prdc
from synthflux.errors import DataError
from synthflux.pipeline import run_pipeline


def gaussian(n: int, seed: int, d: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_a_set_against_itself_is_at_distance_zero_and_fully_covered():
    x = gaussian(300, 1)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # KID's unbiased estimator over two permutations of the same 300 rows is, exactly,
    # 2 (mean k(x, x') - mean k(x, x)) / m: slightly below zero, shrinking as 1/m.
    k = (x @ x.T / x.shape[1] + 1) ** 3
    off, diag = (k.sum() - np.trace(k)) / (300 * 299), np.trace(k) / 300
    assert kid(x, x) == pytest.approx(2 * (off - diag) / 300, rel=1e-9)
    assert abs(kid(x, x)) < 0.06  # vs 0.19 at noise level 1 below
    assert prdc(x, x) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_fd_and_kid_grow_as_one_set_is_perturbed_more():
    x, z = gaussian(300, 1), gaussian(300, 2)
    noise = np.random.default_rng(3).normal(size=z.shape)
    fds, kids = [], []
    for sigma in (0.5, 1.0, 2.0):
        y = z + sigma * noise
        fds.append(frechet_distance(x, y))
        kids.append(kid(x, y))
    assert fds == sorted(fds) and kids == sorted(kids), (fds, kids)
    assert fds[0] < 0.5 * fds[1] < 0.5 * fds[2]  # strictly, not by rounding
    assert kids[2] > 1.0 > kids[1] > 0.05  # at sigma 1 and 2: far above KID's O(1/m) noise


def test_fd_of_two_gaussians_is_the_closed_form():
    """Diagonal covariances: ||mu1 - mu2||² + sum(s1 + s2 - 2 sqrt(s1 s2)), with the sample
    moments (np.cov, ddof 1), to rtol 1e-6."""
    rng = np.random.default_rng(4)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 2
    sd1, sd2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    # Whitened samples: exactly these means and (diagonal) covariances.
    base = rng.normal(size=(500, d))
    base = (base - base.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(base, rowvar=False))).T
    x, y = mu1 + base * sd1, mu2 + base[::-1] * sd2
    s1, s2 = sd1**2, sd2**2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_prdc_follows_the_papers_reference_code():
    """The chunked version equals Naeem et al.'s reference formulas on whole matrices."""
    real, fake = gaussian(120, 5), gaussian(90, 6) * 1.3 + 0.2
    k = 5

    def pairwise(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(pairwise(real, real), axis=1)[:, k]
    r_fake = np.sort(pairwise(fake, fake), axis=1)[:, k]
    d = pairwise(real, fake)
    expected = {
        "precision": (d < r_real[:, None]).any(axis=0).mean(),
        "recall": (d < r_fake[None, :]).any(axis=1).mean(),
        "density": (1 / k) * (d < r_real[:, None]).sum(axis=0).mean(),
        "coverage": (d.min(axis=1) < r_real).mean(),
    }
    got = prdc(real, fake, k)
    assert got is not None and set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1  # a case with something to find


def test_too_few_images_are_none_not_nan_or_a_crash():
    one, five = gaussian(1, 7), gaussian(5, 8)
    m = compare(one, five)
    assert m["fd"] is None and m["kid"] is None and m["diversity"] is None
    assert m["precision"] is None and m["coverage"] is None
    m = compare(five, gaussian(6, 9))  # FD and KID need 2 a set, PRDC more than k = 5
    assert m["fd"] is not None and m["kid"] is not None and m["precision"] is None
    assert compare(np.zeros((0, 16)), five)["fd"] is None


def test_the_duplicate_rate_counts_an_injected_twin():
    x = gaussian(20, 10)
    labels = np.array([0] * 10 + [1] * 10)
    rates = duplicate_rates(x, labels, ["a", "b"])
    assert rates["duplicates"] == 0 and rates["rate"] == 0.0
    # image 3 copied, and image 15 nudged by 1e-4 of a unit: both pairs are twins
    twin = x[15] + 1e-4
    x2 = np.vstack([x, x[3], twin])
    labels2 = np.append(labels, [0, 1])
    rates = duplicate_rates(x2, labels2, ["a", "b"])
    assert rates["per_class"]["a"] == {"images": 11, "duplicates": 2, "rate": 2 / 11}
    assert rates["per_class"]["b"]["duplicates"] == 2
    assert rates["rate"] == pytest.approx(4 / 22, abs=1e-12)
    # a copy filed under the other class is no twin
    rates = duplicate_rates(np.vstack([x, x[3]]), np.append(labels, 1), ["a", "b"])
    assert rates["duplicates"] == 0


def test_features_are_the_last_block_averaged_over_space():
    """reference.features: (N, C') float32, C' the last block's channels: the mean over space
    of the maps that Flatten and the Dense layer turn into the model's logits."""
    import torch

    from synthflux.reference import build_model, features
    from synthflux.weights import init_weights

    weights = init_weights(16, 16, 1, 3, seed=1, channels_per_block=(4, 6))
    images = np.asfortranarray(np.random.default_rng(2).normal(size=(16, 16, 1, 7)), np.float32)
    f = features(weights, images, batch_size=3)
    assert f.shape == (7, 6) and f.dtype == np.float32
    model = build_model(weights)
    batch = torch.from_numpy(np.ascontiguousarray(images.T))
    with torch.no_grad():
        maps = model[:-2](batch)
        assert torch.allclose(model[-1](maps.flatten(1)), model(batch))  # the penultimate cut
    np.testing.assert_allclose(f, maps.numpy().mean(axis=(2, 3)), rtol=1e-6)
    assert features(weights, images[..., :0]).shape == (0, 6)


# --- end to end -------------------------------------------------------------------------


def write_real(folder: Path, per_class: int, offset: int) -> Path:
    """cat/ and dog/: sklearn digits 0 and 1, 8x8 grayscale, `per_class` each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in (("cat", 0), ("dog", 1)):
        (folder / name).mkdir(parents=True)
        rows = np.flatnonzero(digits.target == digit)[offset : offset + per_class]
        for i in rows:
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / name / f"{i}.png")
    return folder


def test_evaluate_compares_each_training_source_with_each_test_set(
    write_config, tmp_path, monkeypatch
):
    _, cfg = write_config(
        cnn={"backend": "reference"}, train={"sources": ["synthetic", "real"], "epochs": 2}
    )
    ingest.run(cfg, write_real(tmp_path / "real-train", 8, 0), split="train")
    ingest.run(cfg, write_real(tmp_path / "real-test", 8, 20), split="test")
    lines: list[str] = []
    run_pipeline(cfg, say=lines.append)
    d = json.loads(cfg.layout.evaluation_summary.read_text())["distribution"]
    assert "NOT comparable with published FID/KID" in d["note"] and d["k"] == 5
    assert [(c["train"], c["test"]) for c in d["comparisons"]] == [
        ("synthetic", "test"),
        ("train", "test"),
    ]
    assert set(d["sources"]) == {"synthetic", "train", "test"}
    synthetic, real = d["comparisons"]
    for c in (synthetic, real):
        assert set(c["per_class"]) == {"cat", "dog"}
        for m in (c["overall"], *c["per_class"].values()):
            assert m["fd"] is not None and m["fd"] >= 0 and m["kid"] is not None
    assert synthetic["overall"]["images"] == {"train": 8, "test": 16}
    assert synthetic["per_class"]["cat"]["precision"] is None  # 4 synthetic cats: not > k
    assert synthetic["overall"]["precision"] is not None  # 8 and 16 images: > k
    assert real["per_class"]["cat"]["images"] == {"train": 8, "test": 8}
    assert real["per_class"]["cat"]["coverage"] is not None
    # real digits are closer to real digits than the tiny model's noise is
    assert real["overall"]["fd"] < synthetic["overall"]["fd"]
    table = [line for line in lines if " vs test (" in line]
    assert len(table) == 2 and all("FD " in line and "duplicates" in line for line in table)
    page = run_report(cfg)
    assert 'id="distribution"' in page and "not comparable with published FID/KID" in page
    print({c["train"]: {k: c["overall"][k] for k in ("fd", "kid")} for c in d["comparisons"]})
    # the features come from the weights evaluate's key holds: replaced meanwhile, it refuses
    before = cfg.layout.evaluation_summary.read_bytes()
    (cfg.layout.evaluation / "stage.json").unlink()
    monkeypatch.setattr(evaluate, "load_weights", replace_then_load)
    with pytest.raises(DataError, match="changed while evaluating"):
        evaluate.run(cfg)
    assert cfg.layout.evaluation_summary.read_bytes() == before
    assert not (cfg.layout.evaluation / "stage.json").exists()  # nothing published


def replace_then_load(path: Path) -> dict[str, np.ndarray]:
    """load_weights, after another process wrote new weights to `path`."""
    from synthflux.weights import load_weights, save_weights

    weights = load_weights(path)
    save_weights(path, {k: (a if k == "arch" else a + 1) for k, a in weights.items()})
    return load_weights(path)


def run_report(cfg) -> str:
    from synthflux import report

    report.run(cfg)
    return (cfg.layout.report / "index.html").read_text()


def test_section_without_a_test_set_is_empty_and_versioned():
    assert isinstance(distribution.VERSION, int)
    x, labels = gaussian(6, 1), np.array([0, 1] * 3)
    d = distribution.section({"synthetic": (x, labels)}, ["synthetic"], [], ["a", "b"])
    assert d["comparisons"] == [] and d["sources"]["synthetic"]["images"] == 6
