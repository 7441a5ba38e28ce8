"""Stage 2: preprocess — image modes, bad input, layout, determinism, resume, memory."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import (
    BASE_CONFIG,
    deep_update,
    mark_generated,
    run_cli,
    run_until_held,
    save_config,
    tree_bytes,
)
from synthflux import preprocess
from synthflux.config import PipelineConfig, PreprocessConfig
from synthflux.errors import DataError
from synthflux.images import load_image


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_dataset(
    root: Path, files: list[tuple[str, str, bytes | None]], sha: dict[int, str] | None = None
) -> None:
    """Write generated/<class>/<name> files and their manifest, as generate would.

    files: (class, file name, bytes or None for "not written"); labels as in BASE_CONFIG.
    """
    gen = root / "generated"
    classes = [c["name"] for c in BASE_CONFIG["classes"]]
    lines = []
    for i, (cls, name, data) in enumerate(files):
        rel = name if name.startswith("..") else f"{cls}/{name}"
        if data is not None:
            (gen / cls).mkdir(parents=True, exist_ok=True)
            (gen / rel).write_bytes(data)
        digest = (sha or {}).get(i) or (hashlib.sha256(data).hexdigest() if data else None)
        lines.append(
            json.dumps(
                {"id": i, "class": cls, "label": classes.index(cls), "file": rel, "sha256": digest}
            )
        )
    gen.mkdir(parents=True, exist_ok=True)
    (gen / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def config_for(
    tmp_path: Path, data: Path, name: str = "pre.toml", **pre
) -> tuple[Path, PipelineConfig]:
    """The config for a dataset make_dataset wrote, marked as generate would mark it."""
    raw = deep_update(BASE_CONFIG, {"preprocess": pre}) | {"data_root": str(data)}
    path, cfg = save_config(tmp_path / name, raw)
    if (data / "generated" / "manifest.jsonl").is_file():
        mark_generated(cfg)
    return path, cfg


def noise_pngs(n: int, size: int = 24, seed: int = 0) -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cls = "cat" if i % 3 else "dog"
        pixels = rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8)
        out.append((cls, f"{cls}-{i:06d}.png", png_bytes(Image.fromarray(pixels))))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- one image: modes and geometry ---------------------------------------------------------

GRAY = PreprocessConfig(width=8, height=8, channels=1, mean=[0.0], std=[1.0])
RGB = PreprocessConfig(width=8, height=8, channels=3, mean=[0.0], std=[1.0])


def decode(tmp_path: Path, data: bytes, cfg: PreprocessConfig, name: str = "x.png") -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return load_image(path, None, cfg)


@pytest.mark.parametrize(
    ("image", "gray", "rgb"),
    [
        (Image.new("L", (16, 16), 51), 0.2, (0.2, 0.2, 0.2)),
        (Image.new("RGB", (16, 16), (255, 0, 0)), 76 / 255, (1.0, 0.0, 0.0)),  # ITU-R 601 luma
        (Image.new("LA", (16, 16), (200, 0)), 0.0, (0.0, 0.0, 0.0)),  # transparent: over black
        (Image.new("LA", (16, 16), (204, 255)), 0.8, (0.8, 0.8, 0.8)),
        (Image.new("RGBA", (16, 16), (0, 0, 255, 255)), 29 / 255, (0.0, 0.0, 1.0)),
        (Image.new("RGBA", (16, 16), (0, 0, 255, 0)), 0.0, (0.0, 0.0, 0.0)),
        (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), 76 / 255, (1.0, 0.0, 0.0)),
        (Image.new("I;16", (16, 16), 16384), 16384 / 65535, (0.25, 0.25, 0.25)),  # keeps 16 bits
        (Image.new("I", (16, 16), 65535), 1.0, (1.0, 1.0, 1.0)),
    ],
    ids=["L", "RGB", "LA-clear", "LA", "RGBA", "RGBA-clear", "CMYK", "I;16", "I"],
)
def test_image_modes(tmp_path, image, gray, rgb):
    tiff = image.mode in ("CMYK", "I")  # PNG cannot hold these modes
    data = png_bytes(image, "TIFF" if tiff else "PNG")
    name = "x.tif" if tiff else "x.png"
    g = decode(tmp_path, data, GRAY, name)
    assert g.shape == (1, 8, 8) and g.dtype == np.float32
    np.testing.assert_allclose(g, gray, atol=1.5 / 255)
    c = decode(tmp_path, data, RGB, name)
    assert c.shape == (3, 8, 8)
    np.testing.assert_allclose(c[:, 0, 0], rgb, atol=1.5 / 255)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (16, 16), 1)
    im.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    left = im.copy()
    left.paste(0, (0, 0, 8, 16))  # left half index 0 (white), declared transparent
    out = decode(tmp_path, png_bytes(left, transparency=0), RGB)
    np.testing.assert_allclose(out[:, 4, 0], 0.0, atol=1e-6)  # transparent -> black
    np.testing.assert_allclose(out[:, 4, 7], (0.0, 1.0, 0.0), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:, :8] = 255  # left half white, 16 wide x 8 high
    im = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    cfg = PreprocessConfig(width=8, height=16, channels=1, aspect="stretch", mean=[0.0], std=[1.0])
    out = decode(tmp_path, png_bytes(im, exif=exif), cfg)[0]
    assert out.shape == (16, 8)  # displayed upright: 8 wide x 16 high
    assert out[:8].mean() > 0.9 and out[8:].mean() < 0.1  # the white half is now on top


def test_animation_uses_first_frame(tmp_path):
    frames = [Image.new("L", (8, 8), v) for v in (10, 200, 90)]
    data = png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode(tmp_path, data, GRAY, "x.gif")
    np.testing.assert_allclose(out, 10 / 255, atol=1 / 255)


@pytest.mark.parametrize(
    ("aspect", "expected_rows"),
    [
        ("stretch", [1.0, 1.0, 1.0, 1.0]),
        ("crop", [1.0, 1.0, 1.0, 1.0]),
        ("pad", [0.5, 1.0, 1.0, 0.5]),
    ],
)
def test_aspect_handling(tmp_path, aspect, expected_rows):
    # 16 wide x 8 high, white; the pad colour is 0.5.
    im = Image.new("L", (16, 8), 255)
    cfg = PreprocessConfig(
        width=4,
        height=4,
        channels=1,
        aspect=aspect,
        pad_value=0.5,
        resample="nearest",
        mean=[0.0],
        std=[1.0],
    )
    out = decode(tmp_path, png_bytes(im), cfg)[0]
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out[:, 0], expected_rows, atol=1 / 255)


def test_crop_keeps_the_centre(tmp_path):
    pixels = np.zeros((8, 24), np.uint8)
    pixels[:, 8:16] = 255  # the centre third is white
    cfg = PreprocessConfig(width=4, height=4, channels=1, aspect="crop", mean=[0.0], std=[1.0])
    out = decode(tmp_path, png_bytes(Image.fromarray(pixels)), cfg)
    assert out.min() > 0.9


def test_normalisation_per_channel(tmp_path):
    cfg = PreprocessConfig(width=4, height=4, channels=3, mean=[0.5, 0.0, 1.0], std=[0.5, 2.0, 1.0])
    out = decode(tmp_path, png_bytes(Image.new("RGB", (4, 4), (255, 255, 0))), cfg)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 0.5, -1.0], atol=1e-6)


# --- bad input: quarantined, the batch goes on -------------------------------------------


def test_bad_inputs_are_quarantined_and_nothing_is_dropped(tmp_path):
    good = Image.new("RGB", (16, 16), (10, 20, 30))
    files = [
        ("cat", "ok-0.png", png_bytes(good)),
        ("cat", "truncated.png", png_bytes(Image.effect_noise((64, 64), 50))[:200]),
        ("cat", "empty.png", b""),
        ("cat", "text.png", b"this is not an image at all\n" * 10),
        ("dog", "jpeg-named.png", png_bytes(good, "JPEG")),
        ("dog", "bomb.png", png_bytes(Image.new("L", (200, 200)))),
        ("dog", "changed.png", png_bytes(good)),
        ("dog", "missing.png", None),
        ("dog", "../../outside.png", png_bytes(good)),
        ("dog", "adir.png", None),  # a folder where the file should be: unreadable
        ("dog", "ok-1.png", png_bytes(good)),
    ]
    data = tmp_path / "data"
    make_dataset(data, files, sha={6: "0" * 64})
    (data / "generated" / "dog" / "adir.png").mkdir()
    _, cfg = config_for(tmp_path, data, width=8, height=8, shard_size=4, max_pixels=20_000)
    summary = preprocess.run(cfg, workers=2)
    assert summary.complete
    rejects = {r["id"]: r for r in read_jsonl(data / "preprocessed/synthetic/rejects.jsonl")}
    reasons = {i: rejects[i]["reason"] for i in rejects}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert "cannot decode" in reasons[1] or "truncated" in reasons[1]
    assert "empty file" in reasons[2]
    assert "not an image" in reasons[3]
    assert "wrongly named" in reasons[4] and "JPEG" in reasons[4]
    assert "decompression bomb" in reasons[5]
    assert "sha256" in reasons[6]
    assert "not found" in reasons[7]
    assert "outside" in reasons[8]
    assert "unreadable" in reasons[9]
    assert all(rejects[i]["file"] for i in rejects) and all("\n" not in r for r in reasons.values())
    kept = read_jsonl(data / "preprocessed" / "synthetic" / "manifest.jsonl")
    assert sorted(r["id"] for r in kept) == [0, 10]  # shard order mixes the classes
    assert set(rejects).isdisjoint(r["id"] for r in kept)
    assert summary.processed == {"synthetic": {"cat": 1, "dog": 1}}
    assert summary.rejected == {"synthetic": {"cat": 3, "dog": 6}}
    dataset = json.loads((data / "preprocessed" / "synthetic" / "dataset.json").read_text())
    assert dataset["counts"] == {"cat": 1, "dog": 1} and dataset["rejected"] == {"cat": 3, "dog": 6}


def test_missing_inputs_are_clear_errors(tmp_path):
    _, cfg = config_for(tmp_path, tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        preprocess.run(cfg)
    (tmp_path / "empty").mkdir()
    path, cfg = config_for(tmp_path, tmp_path / "empty")
    with pytest.raises(DataError, match="manifest.jsonl not found"):
        preprocess.run(cfg)
    result = run_cli("preprocess", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "run `synthflux generate` first" in result.stderr


# --- shards: layout, determinism, resume, memory -------------------------------------------


def test_shard_layout_dtype_and_range(tmp_path):
    files = noise_pngs(7)
    data = tmp_path / "data"
    make_dataset(data, files)
    _, cfg = config_for(tmp_path, data, width=12, height=10, shard_size=3, mean=[0.5], std=[0.25])
    preprocess.run(cfg, workers=1)
    out = data / "preprocessed" / "synthetic"
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["layout"] == "WHCN" and dataset["shape"] == [12, 10, 1]
    assert [s["count"] for s in dataset["shards"]] == [3, 3, 1]
    manifest = read_jsonl(out / "manifest.jsonl")
    row_of = {r["id"]: (r["shard"], r["row"]) for r in manifest}
    for shard in dataset["shards"]:
        with np.load(out / shard["file"], allow_pickle=False) as z:
            assert sorted(z.files) == ["ids", "images", "labels"]
            images, ids, labels = z["images"], z["ids"], z["labels"]
        assert images.dtype == np.float32 and images.flags.f_contiguous
        assert images.shape == (12, 10, 1, shard["count"])
        assert ids.dtype == labels.dtype == np.int64
        assert images.min() >= -2.0 - 1e-6 and images.max() <= 2.0 + 1e-6  # (x - .5) / .25
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        for row, i in enumerate(ids):
            assert row_of[int(i)] == (shard["file"], row)
            cls, name, _ = files[int(i)]
            assert labels[row] == (0 if cls == "cat" else 1)
            # images[x, y, 0, n] is the pixel at column x, row y (Flux's WHCN).
            expected = load_image(data / "generated" / cls / name, None, cfg.preprocess)
            np.testing.assert_array_equal(images[..., row].T, expected)
    assert len(list((out / "previews").glob("*.png"))) == 7  # up to 4 per class


def test_same_bytes_whatever_the_workers_and_shard_split(tmp_path):
    files = noise_pngs(11)
    roots = {}
    for label, runs in {
        "w1": [(None, 1)],
        "w2": [(None, 2)],
        "split": [("0/2", 2), ("1/2", 1)],
    }.items():
        data = tmp_path / label
        make_dataset(data, files)
        _, cfg = config_for(tmp_path, data, name=f"{label}.toml", shard_size=4)
        from synthflux.storage import ShardSpec

        summaries = [
            preprocess.run(cfg, shard=ShardSpec.parse(s) if s else None, workers=w) for s, w in runs
        ]
        assert summaries[-1].complete
        roots[label] = tree_bytes(data / "preprocessed")
    assert len(roots["w1"]) > 5
    assert roots["w1"] == roots["w2"] == roots["split"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    files = noise_pngs(1500, size=48)
    ref_data, killed_data = tmp_path / "ref", tmp_path / "killed"
    make_dataset(ref_data, files)
    make_dataset(killed_data, files)
    _, ref_cfg = config_for(tmp_path, ref_data, name="ref.toml", shard_size=100)
    path, _ = config_for(tmp_path, killed_data, name="killed.toml", shard_size=100)
    preprocess.run(ref_cfg, workers=1)

    proc = run_until_held(["preprocess", str(path), "--workers", "2"], hold="shard:3")
    out = killed_data / "preprocessed"
    assert len(list(out.glob("*/shard-*.json"))) == 3
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "dataset.json").exists()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers outlived their killed parent"
    result = run_cli("preprocess", str(path))
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    assert tree_bytes(out) == tree_bytes(ref_data / "preprocessed")
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".*npy*"))


def test_corrupted_shard_is_redone(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, noise_pngs(6))
    _, cfg = config_for(tmp_path, data, shard_size=3)
    preprocess.run(cfg, workers=1)
    before = tree_bytes(data / "preprocessed")
    shard = data / "preprocessed" / "synthetic" / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:-10])
    again = preprocess.run(cfg, workers=1)
    assert (again.shards_reused, again.shards_done) == (1, 1)
    assert tree_bytes(data / "preprocessed") == before


PEAK_RSS = """
import resource, sys
from synthflux.config import load_config
from synthflux import preprocess
preprocess.run(load_config(sys.argv[1]), workers=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    peaks = {}
    for n in (500, 4000):
        data = tmp_path / f"n{n}"
        make_dataset(data, noise_pngs(n, size=32))
        path, _ = config_for(tmp_path, data, name=f"{n}.toml", width=32, height=32, shard_size=250)
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
        )
        peaks[n] = int(result.stdout.split()[-1])
    assert peaks[4000] <= peaks[500] * 1.2, peaks
