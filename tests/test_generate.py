"""Stage 1: generate — determinism, sharding, resume, safety checker, manifest, errors."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, run_until_held, tree_bytes
from synthflux import generate
from synthflux.config import load_config
from synthflux.errors import ModelError
from synthflux.records import PNG_KEY, image_seed, pixels_sha256, plan_images
from synthflux.storage import ShardSpec, sha256_file


def generated(data: Path) -> dict[str, bytes]:
    return tree_bytes(data / "generated", "**/*.png") | {
        "manifest.jsonl": (data / "generated" / "manifest.jsonl").read_bytes()
    }


def manifest(data: Path) -> list[dict]:
    lines = (data / "generated" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_same_config_twice_gives_identical_bytes(write_config, tmp_path):
    _, cfg_a = write_config(data=tmp_path / "a")
    _, cfg_b = write_config(data=tmp_path / "b", name="b.toml")
    summary = generate.run(cfg_a)
    generate.run(cfg_b)
    assert summary.generated == 8 and summary.manifest_complete
    a, b = generated(tmp_path / "a"), generated(tmp_path / "b")
    assert len(a) == 9 and a == b
    # Different images really differ (seeds are per image, not per run).
    pngs = [
        np.asarray(Image.open(tmp_path / "a/generated" / r["file"]))
        for r in manifest(tmp_path / "a")
    ]
    assert len({p.tobytes() for p in pngs}) == len(pngs)


def test_kept_pipelines_load_once_and_change_no_image(write_config, tmp_path, monkeypatch):
    """A sweep's settings of one model share its pipeline, loaded once; every image equals
    the one a fresh run makes (guidance is per call, not part of the loaded pipeline)."""
    from synthflux import diffusion

    loads: list[str] = []
    load = diffusion.load_pipeline
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: loads.append("x") or load(*a))
    _, low = write_config(data=tmp_path / "low")
    _, high = write_config(data=tmp_path / "high", name="h.toml", generate={"guidance_scale": 9.0})
    with diffusion.pipelines_kept():
        generate.run(low)
        generate.run(high)
    assert len(loads) == 1
    _, alone = write_config(
        data=tmp_path / "alone", name="a.toml", generate={"guidance_scale": 9.0}
    )
    generate.run(alone)
    assert len(loads) == 2  # outside, nothing is kept
    assert generated(tmp_path / "high") == generated(tmp_path / "alone")
    assert generated(tmp_path / "high") != generated(tmp_path / "low")


def test_a_different_seed_changes_the_images(write_config, tmp_path):
    _, cfg_a = write_config(data=tmp_path / "a")
    _, cfg_b = write_config(data=tmp_path / "b", name="b.toml", seed=8)
    generate.run(cfg_a)
    generate.run(cfg_b)
    a, b = generated(tmp_path / "a"), generated(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".png"))


def test_batch_size_does_not_change_the_images(write_config, tmp_path):
    """Each image has its own generator, so batching changes nothing visible.

    Batched CPU kernels may sum in another order, so a pixel can differ by one level of 255
    across batch sizes; at a fixed batch size the bytes are identical (other tests).
    """
    _, cfg_1 = write_config(data=tmp_path / "b1", generate={"batch_size": 1})
    _, cfg_5 = write_config(data=tmp_path / "b5", name="b5.toml", generate={"batch_size": 5})
    generate.run(cfg_1)
    generate.run(cfg_5)
    m1, m5 = manifest(tmp_path / "b1"), manifest(tmp_path / "b5")
    assert [r["seed"] for r in m1] == [r["seed"] for r in m5]
    for r in m1:
        x = np.asarray(Image.open(tmp_path / "b1/generated" / r["file"]), dtype=int)
        y = np.asarray(Image.open(tmp_path / "b5/generated" / r["file"]), dtype=int)
        assert np.abs(x - y).max() <= 1
        assert (x == y).mean() > 0.99


def test_shards_union_equals_unsharded_run(write_config, tmp_path):
    _, whole = write_config(data=tmp_path / "whole")
    _, sharded = write_config(data=tmp_path / "sharded", name="s.toml")
    generate.run(whole)
    summaries = [generate.run(sharded, shard=ShardSpec(i, 3)) for i in range(3)]
    # Shards take whole batches (3 images, per class): cat 0-2 | cat 3 | dog 0-2 | dog 3.
    assert [s.planned for s in summaries] == [4, 1, 3]
    assert [s.manifest_complete for s in summaries] == [False, False, True]
    assert generated(tmp_path / "whole") == generated(tmp_path / "sharded")


@pytest.mark.slow
def test_limit_then_resume_equals_one_run(write_config, tmp_path):
    _, whole = write_config(data=tmp_path / "whole")
    _, parts = write_config(data=tmp_path / "parts", name="p.toml")
    generate.run(whole)
    first = generate.run(parts, limit=3)
    assert (first.generated, first.remaining, first.manifest_images) == (3, 5, 3)
    second = generate.run(parts)
    assert (second.reused, second.generated) == (3, 5)
    assert generated(tmp_path / "whole") == generated(tmp_path / "parts")


def test_corrupted_image_is_regenerated(write_config, tmp_path):
    _, cfg = write_config()
    generate.run(cfg)
    before = generated(cfg.data_root)
    victim = cfg.data_root / "generated" / manifest(cfg.data_root)[2]["file"]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    again = generate.run(cfg)
    # Its whole batch (batch_size 3) is made again, so the image comes from the same call.
    assert (again.reused, again.generated) == (5, 3)
    assert generated(cfg.data_root) == before


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(write_config, tmp_path):
    many = {"images_per_class": 30, "generate": {"batch_size": 2}}
    path, cfg = write_config(data=tmp_path / "killed", **many)
    _, reference = write_config(data=tmp_path / "reference", name="ref.toml", **many)
    generate.run(reference)

    proc = run_until_held(["generate", str(path)], hold="image:10")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = cfg.data_root / "generated"
    made = len(list(out.glob("*/*.png")))
    assert made == 10, made
    assert not (out / "manifest.jsonl").exists()

    result = run_cli("generate", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{made} already done" in result.stdout
    assert generated(cfg.data_root) == generated(reference.data_root)
    assert not list(out.rglob(".*.tmp")), "temp files of the killed run were left behind"


def test_manifest_schema_and_embedded_records(write_config):
    _, cfg = write_config()
    generate.run(cfg)
    records = manifest(cfg.data_root)
    jobs = plan_images(cfg)
    # An image's id is label * 1,000,000 + index: no class's count renames another's images.
    assert [r["id"] for r in records] == [j.id for j in jobs]
    assert [j.id for j in jobs] == [0, 1, 2, 3, 1_000_000, 1_000_001, 1_000_002, 1_000_003]
    types = {
        "id": int, "name": str, "class": str, "label": int, "index": int, "prompt": str,
        "negative_prompt": str, "seed": int, "attempt": int, "flagged_seeds": list,
        "model": str, "model_revision": str, "scheduler": str, "steps": int,
        "guidance_scale": float, "width": int, "height": int, "file": str, "sha256": str,
        "status": str, "batch_size": int, "batch_images": int, "pixels_sha256": str,
        "model_prompt": str,
    }  # fmt: skip
    for rec, job in zip(records, jobs, strict=True):
        assert set(rec) == set(types)
        assert all(isinstance(rec[k], t) for k, t in types.items()), rec
        assert rec["label"] == cfg.class_names.index(rec["class"])
        assert rec["seed"] == image_seed(cfg.seed, rec["class"], rec["index"], 0)
        assert rec["model_revision"].startswith("sha256:")
        assert rec["scheduler"] == "DDIMScheduler"
        assert rec["prompt"] == job.prompt and rec["prompt"].endswith(", studio photo")
        path = cfg.data_root / "generated" / rec["file"]
        assert path.parent.name == rec["class"]
        assert sha256_file(path) == rec["sha256"]
        with Image.open(path) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            embedded = json.loads(im.text[PNG_KEY])
            pixels = np.asarray(im.convert("RGB"))
        assert embedded == {k: v for k, v in rec.items() if k not in ("sha256", "status")}
        # The record vouches for its pixels, and says what the model read of the prompt.
        assert rec["pixels_sha256"] == pixels_sha256(pixels)
        assert rec["model_prompt"] == rec["prompt"]  # short enough for CLIP: read whole
        assert (rec["batch_size"], rec["batch_images"]) == (3, 3 if rec["index"] < 3 else 1)
    # Template variables expand in a fixed order, cycling over the images of a class.
    cat_prompts = [r["prompt"].removesuffix(", studio photo") for r in records[:4]]
    assert cat_prompts == ["a black cat", "a white cat", "a cat asleep", "a black cat"]


def test_seeds_depend_only_on_identity():
    assert image_seed(1, "cat", 3) == image_seed(1, "cat", 3)
    seeds = {image_seed(1, c, i, a) for c in ("cat", "dog") for i in range(50) for a in range(3)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


class FlaggingPipe:
    """Wraps the real pipeline and flags some images, as a safety checker would."""

    def __init__(self, pipe, flag_first_attempts: int):
        self.pipe, self.flag_first_attempts, self.calls = pipe, flag_first_attempts, 0

    def __call__(self, **kwargs):
        result = self.pipe(**kwargs)
        seeds = [g.initial_seed() for g in kwargs["generator"]]
        # Flag images whose seed is the first attempt of ids 1 and 5.
        result.nsfw_content_detected = [s in self.flag_first_attempts for s in seeds]
        self.calls += 1
        return result


@pytest.mark.parametrize("policy", ["regenerate", "drop"])
def test_flagged_images_are_never_written_silently(write_config, monkeypatch, policy):
    import synthflux.generate as gen_mod

    _, cfg = write_config(generate={"on_flagged": policy, "max_attempts": 2})
    jobs = plan_images(cfg)
    flagged = {image_seed(cfg.seed, jobs[i].class_name, jobs[i].index, 0) for i in (1, 5)}
    real_load = gen_mod.load_pipeline
    monkeypatch.setattr(
        gen_mod, "load_pipeline", lambda c, m: FlaggingPipe(real_load(c, m), flagged)
    )
    summary = generate.run(cfg)
    records = {r["id"]: r for r in manifest(cfg.data_root)}
    ids = [job.id for job in jobs]
    dropped_path = cfg.data_root / "generated" / "dropped.jsonl"
    dropped = [json.loads(line) for line in dropped_path.read_text().splitlines()]
    if policy == "regenerate":
        assert summary.regenerated_flagged == 2 and summary.dropped == 0 and not dropped
        for i in (1, 5):
            rec = records[ids[i]]
            assert rec["attempt"] == 1
            assert rec["seed"] == image_seed(cfg.seed, jobs[i].class_name, jobs[i].index, 1)
            assert rec["flagged_seeds"] == [
                image_seed(cfg.seed, jobs[i].class_name, jobs[i].index, 0)
            ]
    else:
        assert summary.dropped == 2 and summary.regenerated_flagged == 0
        assert sorted(records) == [ids[i] for i in (0, 2, 3, 4, 6, 7)]
        assert [d["id"] for d in dropped] == [ids[1], ids[5]]
        assert all(d["status"] == "dropped" and len(d["flagged_seeds"]) == 1 for d in dropped)
        for i in (1, 5):
            assert not (cfg.data_root / "generated" / jobs[i].file).exists()
    # A re-run remembers the outcome instead of generating again.
    again = generate.run(cfg)
    assert again.generated == 0 and again.reused == 8


def test_model_tiny_builds_the_model_under_the_data_root(write_config):
    _, cfg = write_config(images_per_class=1, generate={"model": "tiny"})
    summary = generate.run(cfg)
    assert summary.generated == 2
    assert (cfg.data_root / "models" / "tiny" / "model_index.json").is_file()
    assert manifest(cfg.data_root)[0]["model"] == "tiny"


def test_missing_local_model_is_a_clear_error(write_config, tmp_path):
    _, cfg = write_config(generate={"model": str(tmp_path / "no-such-model")})
    with pytest.raises(ModelError, match="no such folder"):
        generate.run(cfg)
    (tmp_path / "empty").mkdir()
    _, cfg = write_config(generate={"model": str(tmp_path / "empty")})
    with pytest.raises(ModelError, match="without model_index.json"):
        generate.run(cfg)
    assert not (cfg.data_root / "generated").exists()


def test_unreachable_hub_model_tells_what_to_do(write_config, tmp_path):
    path, _ = write_config(generate={"model": "someone/not-cached-model"})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("generate", str(path), env=env)
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert "someone/not-cached-model" in err[0] and "HF_HUB_OFFLINE" in err[0]


def test_cli_generate_end_to_end(write_config, tmp_path):
    path, _ = write_config()
    result = run_cli("generate", str(path), "--data", str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr
    assert "8 generated" in result.stdout and "(complete)" in result.stdout
    assert len(list((tmp_path / "elsewhere/generated").glob("*/*.png"))) == 8
    assert not (tmp_path / "data").exists()  # --data overrides data_root


@pytest.mark.parametrize("bad", ["3", "3/2", "-1/2", "a/b", "1/0"])
def test_bad_shard_spec(write_config, bad):
    path, _ = write_config()
    result = run_cli("generate", str(path), "--shard", bad)
    assert result.returncode == 2 and "--shard" in result.stderr


def test_png_bytes_are_deterministic_for_the_same_pixels():
    from synthflux.png_writer import to_png

    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    a, b = to_png(pixels, {"id": 1}), to_png(pixels, {"id": 1})
    assert a == b
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a))), pixels)


def test_example_configs_are_valid():
    for name, classes in [("tiny", 2), ("sd15", 2), ("sd-turbo", 2), ("sweep", 2),
                          ("digits", 10), ("real", 10)]:  # fmt: skip
        cfg = load_config(REPO / "examples" / f"{name}.toml")
        assert len(cfg.classes) == classes
        # paths are the config file's: its data root is the repository's data/, from anywhere
        assert cfg.data_root.resolve().parent in (REPO / "data", REPO)


def test_local_model_revision_is_cached_and_follows_file_changes(
    write_config, tiny_model, tmp_path
):
    import shutil

    from synthflux.diffusion import resolve_model

    model = tmp_path / "my-model"
    shutil.copytree(tiny_model, model)
    _, cfg = write_config(generate={"model": str(model)})
    first = resolve_model(cfg).revision
    cache = cfg.data_root / "models" / "revisions.json"
    assert json.loads(cache.read_text())[str(model.resolve())]["revision"] == first
    assert resolve_model(cfg).revision == first  # served from the cache
    config = model / "unet" / "config.json"
    config.write_text(config.read_text().replace('"norm_num_groups": 4', '"norm_num_groups": 2'))
    assert resolve_model(cfg).revision != first
