"""The PyTorch reference of the Flux CNN: golden files, layout conventions, weights I/O."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from flux_numpy import numpy_forward

from synthflux import contracts, reference
from synthflux.errors import DataError
from synthflux.weights import check_weights, init_weights, load_weights, save_weights, spec_of

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "weights.npz").is_file())


def golden_shards(case: str) -> list[Path]:
    return sorted((GOLDEN / case).glob("shard-*.npz"))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def random_images(rng: np.random.Generator, w: int, h: int, c: int, n: int) -> np.ndarray:
    return np.asfortranarray(rng.standard_normal((w, h, c, n)), dtype=np.float32)


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_golden(case: str) -> None:
    weights = load_weights(GOLDEN / case / "weights.npz")
    shards = golden_shards(case)
    assert shards
    for shard in shards:
        data = load_npz(shard)
        expected = load_npz(GOLDEN / case / "expected" / shard.name.replace(".npz", ".probs.npz"))
        probs = reference.predict(weights, data["images"])
        # Against the float64 forward pass, within the case's stated float32 tolerance.
        np.testing.assert_allclose(probs, expected["probs"], atol=expected["atol"][0], rtol=0)
        np.testing.assert_array_equal(expected["ids"], data["ids"])


@pytest.mark.parametrize("case", CASES)
def test_golden_files_follow_the_contract(case: str) -> None:
    weights = load_npz(GOLDEN / case / "weights.npz")
    spec = check_weights(weights)
    assert spec.width != spec.height  # non-square: a W/H swap cannot go unnoticed
    for shard in golden_shards(case):
        data = load_npz(shard)
        images = data["images"]
        assert images.dtype == np.float32 and images.flags.f_contiguous
        assert images.shape[:3] == (spec.width, spec.height, spec.channels)
        assert data["ids"].dtype == data["labels"].dtype == np.int64
        probs = load_npz(GOLDEN / case / "expected" / shard.name.replace(".npz", ".probs.npz"))
        assert probs["probs"].dtype == np.float32
        assert probs["probs"].shape == (images.shape[3], spec.n_classes)
        # Spread-out probabilities are what make the 1e-5 comparison a sharp test.
        assert probs["probs"].max() - probs["probs"].min() > 0.3


def test_make_golden_reproduces_committed_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(tmp_path)])
    committed = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*.npz"))
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.npz"))
    for rel in committed:
        old, new = load_npz(GOLDEN / rel), load_npz(tmp_path / rel)
        assert old.keys() == new.keys()
        for name in old:
            if _computed_by_torch(rel, name):
                # float32 results of BLAS/oneDNN kernels differ in the last bits between CPU
                # kinds (about 1 ULP, 6e-8, seen on AVX-512): compare within a stated tolerance.
                np.testing.assert_allclose(new[name], old[name], rtol=1e-5, atol=1e-6)
            else:  # inputs made by our own seeded code: the same bytes on every machine
                np.testing.assert_array_equal(new[name], old[name])


def _computed_by_torch(rel: Path, name: str) -> bool:
    """The trained case's losses, history and weights, and the forward pass's probabilities."""
    return name == "probs" or rel == Path("train/expected.npz")


# --- conventions: flip, WHCN vs NCHW, flatten order ------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "c", "k", "kernel", "blocks"),
    [(12, 10, 1, 2, 3, (4, 6)), (9, 14, 3, 3, 5, (3,)), (16, 8, 2, 2, 3, (2, 3, 4))],
)
def test_torch_reference_agrees_with_independent_numpy(w, h, c, k, kernel, blocks) -> None:
    weights = init_weights(w, h, c, k, seed=5, channels_per_block=blocks, kernel=kernel)
    weights["dense_weight"] *= 8  # sharpen, so errors show in the probabilities
    images = random_images(np.random.default_rng(0), w, h, c, 5)
    np.testing.assert_allclose(
        reference.predict(weights, images),
        numpy_forward(weights, images),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("case", [c for c in CASES if c != "kernel1"])  # 1x1: nothing to flip
def test_golden_catches_a_missing_kernel_flip(case: str) -> None:
    """Cross-correlating instead of convolving must move the golden probs far beyond 1e-5."""
    weights = load_weights(GOLDEN / case / "weights.npz")
    unflipped = dict(weights)
    for name in weights:
        if name.endswith("_weight") and name.startswith("conv"):
            unflipped[name] = np.ascontiguousarray(weights[name][::-1, ::-1])
    images = load_npz(golden_shards(case)[0])["images"]
    diff = np.abs(reference.predict(unflipped, images) - reference.predict(weights, images))
    assert diff.max() > 1e-3


def test_the_golden_cases_cover_the_shapes_that_broke() -> None:
    """A 1x1 kernel (it crashed the reference), three blocks with K > 2, and large logits."""
    specs = {c: spec_of(load_weights(GOLDEN / c / "weights.npz")) for c in CASES}
    assert any(s.kernel == 1 for s in specs.values())
    assert any(len(s.block_channels) >= 3 and s.n_classes > 2 for s in specs.values())
    assert any(s.n_classes == 10 and s.kernel == 7 for s in specs.values())


def test_image_axes_are_width_then_height() -> None:
    """images[x, y]: a feature in the left columns must reach the output through column x."""
    weights = init_weights(12, 10, 1, seed=1, channels_per_block=(4,))
    weights["dense_weight"] *= 8
    images = np.zeros((12, 10, 1, 2), dtype=np.float32, order="F")
    images[:4, :, 0, 0] = 3.0  # left columns
    images[:, :4, 0, 1] = 3.0  # top rows
    probs = reference.predict(weights, images)
    np.testing.assert_allclose(probs, numpy_forward(weights, images), atol=1e-5, rtol=0)
    assert not np.allclose(probs[0], probs[1], atol=1e-4)


# --- shapes, probabilities, init ------------------------------------------------------------


@pytest.mark.parametrize(("w", "h", "c", "k"), [(64, 64, 1, 2), (32, 48, 3, 2), (7, 5, 2, 4)])
def test_shapes_and_rows_sum_to_one(w: int, h: int, c: int, k: int) -> None:
    blocks = (8, 16) if min(w, h) >= 4 else (8,)
    weights = init_weights(w, h, c, k, seed=0, channels_per_block=blocks)
    images = random_images(np.random.default_rng(1), w, h, c, 7)
    probs = reference.predict(weights, images, batch_size=3)  # uneven batches
    assert probs.shape == (7, k) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (probs > 0).all()


def test_predict_is_batch_size_independent() -> None:
    weights = init_weights(20, 12, 3, seed=4)
    images = random_images(np.random.default_rng(2), 20, 12, 3, 10)
    np.testing.assert_allclose(
        reference.predict(weights, images, batch_size=1),
        reference.predict(weights, images, batch_size=64),
        atol=1e-6,
    )


def test_init_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a = init_weights(16, 12, 3, seed=7)
    b = init_weights(16, 12, 3, seed=7)
    c = init_weights(16, 12, 3, seed=8)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert all(not np.array_equal(a[n], c[n]) for n in a if n != "arch")
    np.testing.assert_array_equal(a["arch"], [1, 16, 12, 3, 2, 3, 2, 8, 16])
    assert a["dense_weight"].shape == (2, 4 * 3 * 16)
    assert a["conv1_weight"].shape == (3, 3, 3, 8)


def test_init_does_not_touch_global_rng() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    init_weights(8, 8, 1, seed=0)
    assert np.random.random() == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel": 4}, "kernel must be odd"),
        ({"n_classes": 1}, "n_classes must be >= 2"),
        ({"channels_per_block": (4, 4, 4, 4)}, "too small"),
    ],
)
def test_bad_arch_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        init_weights(12, 10, 1, **kwargs)


# --- weights.npz and shard I/O --------------------------------------------------------------


def test_save_load_round_trip_is_atomic(tmp_path: Path) -> None:
    weights = init_weights(12, 10, 3, seed=1)
    path = tmp_path / "model" / "weights.npz"
    save_weights(path, weights)
    assert [p.name for p in path.parent.iterdir()] == ["weights.npz"]  # no temp file left
    loaded = load_weights(path)
    for name in weights:
        np.testing.assert_array_equal(loaded[name], weights[name])
        assert loaded[name].dtype == weights[name].dtype


def _save_raw(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda w: w.pop("conv2_bias"), "missing array `conv2_bias`"),
        (
            lambda w: w.update(dense_weight=w["dense_weight"][:, :-1]),
            "`dense_weight` must be",
        ),
        (
            lambda w: w.update(conv1_weight=w["conv1_weight"].astype(np.float64)),
            "float32",
        ),
        (lambda w: w.update(arch=w["arch"][:-1]), "bad `arch`"),
        (lambda w: w.update(extra=np.zeros(2, np.float32)), "unexpected arrays"),
        (lambda w: w["dense_bias"].__setitem__(0, np.nan), "NaN or Inf"),
    ],
)
def test_load_weights_rejects_what_does_not_fit(tmp_path: Path, mutate, match: str) -> None:
    weights = init_weights(12, 10, 1, seed=0)
    mutate(weights)
    path = _save_raw(tmp_path / "weights.npz", weights)
    with pytest.raises(DataError, match=match) as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_predict_shard_writes_what_julia_writes(tmp_path: Path) -> None:
    shard = golden_shards("gray")[1]
    weights = load_weights(GOLDEN / "gray" / "weights.npz")
    out = reference.predict_shard(shard, weights, tmp_path / "pred")
    assert out == tmp_path / "pred" / "shard-00001.probs.npz"
    got, expected = load_npz(out), load_npz(GOLDEN / "gray" / "expected" / out.name)
    assert got.keys() == {"probs", "ids"}
    np.testing.assert_allclose(got["probs"], expected["probs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["ids"], expected["ids"])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["images"].__setitem__((0, 0, 0, 1), np.inf), "NaN or Inf"),
        (lambda d: d.update(images=d["images"].astype(np.float64)), "float32"),
        (lambda d: d.update(images=d["images"][:, :, :, 0]), "float32"),
        (lambda d: d.update(ids=d["ids"][:-1]), "`ids` must be int64"),
        (lambda d: d.pop("labels"), "missing array `labels`"),
        (
            lambda d: d.update(images=np.asfortranarray(d["images"][:-1])),
            "weights expect",
        ),
    ],
)
def test_bad_shards_are_rejected(tmp_path: Path, mutate, match: str) -> None:
    data = load_npz(golden_shards("gray")[0])
    mutate(data)
    shard = _save_raw(tmp_path / "shard-00000.npz", data)
    weights = load_weights(GOLDEN / "gray" / "weights.npz")
    with pytest.raises(DataError, match=match):
        reference.predict_shard(shard, weights, tmp_path / "pred")
    assert not (tmp_path / "pred" / "shard-00000.probs.npz").exists()


def test_truncated_shard_is_a_data_error(tmp_path: Path) -> None:
    shard = tmp_path / "shard-00000.npz"
    shard.write_bytes(golden_shards("gray")[0].read_bytes()[:300])
    with pytest.raises(DataError, match="shard-00000.npz"):
        contracts.read_shard(shard)


def test_the_default_cnn_is_the_same_in_both_languages() -> None:
    """Each language states the default network once; they must agree (CI has no Julia, so
    julia/src/arch.jl is read as text)."""
    import re

    from synthflux.weights import DEFAULT_BLOCKS, DEFAULT_CLASSES, DEFAULT_KERNEL

    text = (Path(__file__).resolve().parents[1] / "julia" / "src" / "arch.jl").read_text()

    def const(name: str) -> str:
        found = re.findall(rf"^const {name} = (.+?)(?:\s*#.*)?$", text, re.MULTILINE)
        assert len(found) == 1, f"julia/src/arch.jl must define {name} once"
        return found[0]

    assert int(const("DEFAULT_KERNEL")) == DEFAULT_KERNEL
    assert int(const("DEFAULT_CLASSES")) == DEFAULT_CLASSES
    blocks = const("DEFAULT_BLOCKS")
    assert tuple(int(v) for v in blocks.strip("[]").split(",")) == DEFAULT_BLOCKS
    # ... and no other Julia file spells out a network shape with literal numbers.
    for path in (Path(__file__).resolve().parents[1] / "julia" / "src").glob("*.jl"):
        assert not re.search(r"ArchSpec\([^)]*\[\d", path.read_text()), path
