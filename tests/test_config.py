"""The pipeline config: every bad field gives one clear error naming it, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from conftest import BASE_CONFIG, deep_update, run_cli
from synthflux.config import load_config
from synthflux.errors import ConfigError

BAD = [
    ({"seed": -1}, "seed = -1"),
    ({"images_per_class": 0}, "images_per_class = 0"),
    ({"classes": [{"name": "only", "prompts": ["x"]}]}, "classes"),
    (
        {"classes": [{"name": "a", "prompts": []}, {"name": "b", "prompts": ["x"]}]},
        "classes.0.prompts",
    ),
    (
        {"classes": [{"name": "a", "prompts": ["{x} y"]}, {"name": "b", "prompts": ["x"]}]},
        "uses {x}",
    ),
    (
        {"classes": [{"name": "Cat", "prompts": ["x"]}, {"name": "cat", "prompts": ["x"]}]},
        "repeats",
    ),
    (
        {
            "classes": [
                {"name": "a", "prompts": ["x"], "images": -2},
                {"name": "b", "prompts": ["x"]},
            ]
        },
        "classes.0.images = -2",
    ),
    ({"generate": {"steps": 0}}, "generate.steps = 0"),
    ({"generate": {"width": 500}}, "generate.width = 500: must be divisible by 8"),
    ({"generate": {"guidance_scale": -1}}, "generate.guidance_scale = -1"),
    ({"generate": {"guidance_scale": [3.0, 1.5]}}, "needs 1 <= low <= high"),
    ({"generate": {"guidance_scale": [0.5, 2.0]}}, "needs 1 <= low <= high"),
    ({"generate": {"guidance_scale": [1.5, 2.0, 3.0]}}, "generate.guidance_scale"),
    ({"pools": {"context": []}}, "pools.context is empty"),
    ({"style": "photo, {light}"}, "style 'photo, {light}' uses {light} but pools has none"),
    (
        {
            "classes": [
                {"name": "a", "prompts": ["x"], "prompts_file": "none.txt"},
                {"name": "b", "prompts": ["x"]},
            ]
        },
        "classes.0: cannot read prompts file",
    ),
    ({"generate": {"batch_size": 0}}, "generate.batch_size = 0"),
    ({"generate": {"device": "tpu"}}, "generate.device = 'tpu'"),
    ({"generate": {"dtype": "int8"}}, "generate.dtype = 'int8'"),
    ({"generate": {"on_flagged": "keep"}}, "generate.on_flagged = 'keep'"),
    ({"generate": {"stepz": 3}}, "generate.stepz"),
    ({"generate": {"scheduler": "bogus"}}, "generate.scheduler = 'bogus'"),
    ({"generate": {"max_attempts": 0}}, "generate.max_attempts = 0"),
    (
        {
            "classes": [
                {"name": "a", "prompts": ["{c}"], "variables": {"c": []}},
                {"name": "b", "prompts": ["x"]},
            ]
        },
        "variables.c is empty",
    ),
    ({"preprocess": {"pad_value": 2}}, "preprocess.pad_value = 2"),
    ({"preprocess": {"max_pixels": 0}}, "preprocess.max_pixels = 0"),
    ({"preprocess": {"workers": -1}}, "preprocess.workers = -1"),
    ({"cnn": {"cpus": 0}}, "cnn.cpus = 0"),
    # Strict types: TOML has real ones, so these are mistakes, not values to coerce.
    ({"images_per_class": True}, "images_per_class = True: Input should be a valid integer"),
    ({"seed": "1234"}, "seed = '1234': Input should be a valid integer"),
    ({"generate": {"compile": "yes"}}, "generate.compile = 'yes'"),
    # An upper bound, per class and in all (ids are label * 1,000,000 + index).
    ({"images_per_class": 10**9}, "images_per_class = 1000000000: Input should be less than"),
    (
        {
            "images_per_class": 600_000,
            "classes": [{"name": "a", "prompts": ["x"]}, {"name": "b", "prompts": ["x"]}],
        },
        "1,200,000 images in all (at most 1,000,000 per config)",
    ),
    ({"cnn": {"batch_size": 0}}, "cnn.batch_size = 0"),
    ({"cnn": {"memory": "lots"}}, "cnn.memory = 'lots'"),
    ({"preprocess": {"channels": 2}}, "preprocess.channels = 2"),
    ({"preprocess": {"aspect": "squash"}}, "preprocess.aspect = 'squash'"),
    ({"preprocess": {"resample": "magic"}}, "preprocess.resample = 'magic'"),
    ({"preprocess": {"mean": [0.1, 0.2]}}, "mean needs 1 or 1 values"),
    ({"preprocess": {"std": [0.0]}}, "std must be > 0"),
    # Values that pass a sign check and then wreck the numbers, and sizes that exhaust memory.
    ({"preprocess": {"std": [1e-45]}}, "std must be > 0 (at least 1e-06)"),
    ({"preprocess": {"mean": [float("nan")]}}, "preprocess.mean.0 = nan: Input should be a finite"),
    ({"preprocess": {"width": 100_000}}, "preprocess.width = 100000: Input should be less than"),
    ({"train": {"eps": float("inf")}}, "train.eps = inf: Input should be a finite number"),
    ({"train": {"lr": float("nan")}}, "train.lr = nan"),
    (
        {"train": {"blocks": [8, 8, 8, 8, 8, 8, 8]}, "preprocess": {"width": 32, "height": 32}},
        "train.blocks has 7 blocks, each halving the image, but preprocess width/height is 32x32",
    ),
    ({"preprocess": {"shard_size": 0}}, "preprocess.shard_size = 0"),
    ({"cnn": {"backend": "k8s"}}, "cnn.backend = 'k8s'"),
    # The CNN's runtime settings moved from [classify] to [cnn]: said so, with where to.
    ({"classify": {"backend": "docker"}}, "classify.backend moved to [cnn] backend"),
    ({"cnn": {"timeout_s": 0}}, "cnn.timeout_s = 0"),
    ({"unknown_key": 1}, "unknown_key"),
    # Settings that would be ignored without the one they work with: said, not dropped.
    ({"filter": {"min_clip_score": 10}}, "min_clip_score = 10.0 needs clip_model"),
    ({"generate": {"images_per_real": 2}}, "images_per_real = 2 needs init_source"),
    ({"generate": {"strength": float("nan")}}, "generate.strength = nan: Input should be a finite"),
    ({"generate": {"devices": ["cuda", "cuda:0"]}}, "'cuda:0' is listed twice"),
    ({"generate": {"device": "cpu", "devices": "all"}}, "devices picks them; leave device out"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_field_is_named_with_its_value(tmp_path, override, message):
    raw = deep_update(BASE_CONFIG, override) | {"data_root": str(tmp_path / "data")}
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "..", ".hidden", "a\\b", "", "x" * 65, "a..b", "/abs"]
)
def test_unsafe_class_names_are_rejected(tmp_path, name):
    raw = deep_update(BASE_CONFIG, {}) | {"data_root": str(tmp_path / "data")}
    raw["classes"][0]["name"] = name
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match="classes.0.name"):
        load_config(path)


def test_cli_reports_bad_config_in_one_line_and_writes_nothing(tmp_path):
    raw = deep_update(BASE_CONFIG, {"generate": {"steps": -3}}) | {
        "data_root": str(tmp_path / "data")
    }
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(raw))
    result = run_cli("generate", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "generate.steps = -3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("seed = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_data_override_and_defaults(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(tomli_w.dumps(deep_update(BASE_CONFIG, {})))
    cfg = load_config(path, data_root=tmp_path / "other")
    assert cfg.data_root == tmp_path / "other"
    assert cfg.generate.device == "auto" and cfg.preprocess.channels == 1
    assert cfg.classes[0].expanded_prompts() == ["a black cat", "a white cat", "a cat asleep"]


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout
    result = run_cli("generate", "--help")
    assert "--shard" in result.stdout and "--limit" in result.stdout and "--data" in result.stdout


def test_every_config_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    """One rule (issue 27 #7): run from anywhere, a config names the same files; a local
    adapter that is missing says so rather than being taken for a Hub id."""
    from synthflux.diffusion import adapters
    from synthflux.errors import ModelError

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "cats.txt").write_text("a cat\n")
    (folder / "emb.bin").write_bytes(b"x")
    raw = deep_update(BASE_CONFIG, {
        "data_root": "../data", "classify": {"weights": "w.npz"},
        "filter": {"clip_model": "openai/clip-vit-base-patch32"},
        "generate": {"model": "owner/model", "textual_inversion": ["emb.bin"],
                     "lora": ["adapters/missing.safetensors"]},
    })  # fmt: skip
    raw["classes"][0]["prompts_file"] = "cats.txt"
    path = folder / "pipeline.toml"
    path.write_text(tomli_w.dumps(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.data_root.resolve() == tmp_path / "project" / "data"
    assert Path(cfg.classify.weights).resolve() == folder / "w.npz"
    assert Path(cfg.generate.textual_inversion[0]).resolve() == folder / "emb.bin"
    assert "a cat" in cfg.classes[0].all_prompts
    assert cfg.generate.model == "owner/model"  # a Hub id: nothing of that name beside it
    assert cfg.filter is not None and cfg.filter.clip_model == "openai/clip-vit-base-patch32"
    with pytest.raises(ModelError, match=r"generate.lora\[0\] = .*missing.safetensors.*no such"):
        adapters(cfg, offline=True)
    # --data is a command-line path: relative to the working directory
    assert load_config(path, data_root="here").data_root.resolve() == elsewhere / "here"
    # the same config read from its own folder means the same files
    monkeypatch.chdir(folder)
    again = load_config("pipeline.toml")
    assert again.data_root.resolve() == cfg.data_root.resolve()
