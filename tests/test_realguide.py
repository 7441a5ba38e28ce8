"""Real-guided generation (img2img from imported training images) and adapters (LoRA,
textual inversion): recorded per image, part of what makes an image "already made"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from digits import keep_classes, write_digits
from PIL import Image

from conftest import BASE_CONFIG, deep_update, run_cli, save_config
from synthflux import generate, ingest, lineage, preprocess
from synthflux.errors import ConfigError, DataError
from synthflux.records import plan_images

DIGITS = ["0", "1"]


def config(tmp_path: Path, tiny_model: Path, name: str = "c.toml", **more):
    raw = deep_update(BASE_CONFIG, {
        "classes": [{"name": d, "prompts": [f"the digit {d}"]} for d in DIGITS],
        "generate": {"model": str(tiny_model), "steps": 4},
    })  # fmt: skip
    raw = deep_update(raw, more)
    raw["data_root"] = str(tmp_path / name.removesuffix(".toml"))
    return save_config(tmp_path / name, raw)


@pytest.fixture
def real(tmp_path: Path) -> tuple[Path, Path]:
    train, test = write_digits(tmp_path / "digits")
    keep_classes((train, test), DIGITS)
    return train, test


def manifest(cfg) -> list[dict]:
    return [json.loads(line) for line in cfg.layout.manifest.read_text().splitlines()]


def pixels(cfg, rec) -> np.ndarray:
    return np.asarray(Image.open(cfg.layout.image(rec["file"])), dtype=float)


def test_images_start_from_the_real_images_of_their_class(tmp_path, tiny_model, real):
    train, _ = real
    guided = {"generate": {"init_source": "train", "strength": 0.5}}
    _, cfg = config(tmp_path, tiny_model, **guided)
    _, twin = config(tmp_path, tiny_model, "twin.toml", **guided)
    _, text = config(tmp_path, tiny_model, "text.toml")
    for c in (cfg, twin):
        ingest.run(c, train, split="train")
        generate.run(c)
    generate.run(text)
    recs = manifest(cfg)
    real_ids = {
        d: sorted(r["id"] for r in manifest_of(cfg, "train") if r["class"] == d) for d in DIGITS
    }
    for rec in recs:  # image i of a class starts from its real image i (in id order)
        assert rec["parent"]["source"] == "train" and rec["strength"] == 0.5
        assert rec["parent"]["id"] == real_ids[rec["class"]][rec["index"]]
    assert manifest(twin) == recs  # the same images from the same seeds and parents
    twin_by_name = {r["name"]: r for r in recs}
    # The real image matters: the same seed from text alone gives another image.
    text_recs = {r["name"]: r for r in manifest(text)}
    assert all(np.abs(pixels(cfg, r) - pixels(text, text_recs[r["name"]])).max() > 10 for r in recs)
    # A changed real image: generate is stale and remakes the batch of the image it guided.
    first = cfg.layout.source("train").image(
        next(r for r in recs if r["index"] == 0)["parent"]["file"]
    )
    original = next(train.glob(f"*/{first.name}"))
    Image.fromarray(255 - np.asarray(Image.open(original))).save(original)
    ingest.run(cfg, train, split="train")
    assert not lineage.is_current(cfg, "generate")
    again = generate.run(cfg)
    assert (again.generated, again.reused) == (3, 5)  # batches of 3 are made whole
    remade = {r["name"]: r for r in manifest(cfg)}
    assert [n for n, r in remade.items() if r["sha256"] != twin_by_name[n]["sha256"]] == [
        recs[0]["name"]
    ]


def manifest_of(cfg, source: str) -> list[dict]:
    path = cfg.layout.source(source).manifest
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_images_per_real_and_the_errors(tmp_path, tiny_model, real):
    train, test = real
    path, cfg = config(
        tmp_path, tiny_model, generate={"init_source": "train", "images_per_real": 2}
    )
    with pytest.raises(DataError, match="no source of that name was imported"):
        plan_images(cfg)
    ingest.run(cfg, train, split="train")
    per_class = {d: sum(1 for r in manifest_of(cfg, "train") if r["class"] == d) for d in DIGITS}
    jobs = plan_images(cfg)
    assert {d: sum(j.class_name == d for j in jobs) for d in DIGITS} == {
        d: 2 * n for d, n in per_class.items()
    }
    ingest.run(cfg, test, split="test")
    _, leaky = config(tmp_path, tiny_model, "leaky.toml", generate={"init_source": "test"})
    ingest.run(leaky, test, split="test")
    with pytest.raises(ConfigError, match="is a test set"):
        plan_images(leaky)
    result = run_cli("generate", str(path), "--limit", "1")
    assert result.returncode == 0, result.stderr


def test_adapters_change_the_images_and_are_recorded(tmp_path, tiny_model):
    import torch
    from safetensors.torch import save_file

    embedding = tmp_path / "zero.safetensors"
    save_file({"<zero>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, embedding)
    lora = tiny_lora(tiny_model, tmp_path / "lora")
    prompts = {"classes": [{"name": d, "prompts": [f"a photo of <zero> {d}"]} for d in DIGITS],
               "images_per_class": 2}  # fmt: skip
    _, plain = config(tmp_path, tiny_model, **prompts)
    _, ti = config(
        tmp_path, tiny_model, "ti.toml", generate={"textual_inversion": [str(embedding)]}, **prompts
    )
    _, both = config(tmp_path, tiny_model, "both.toml",
                     generate={"textual_inversion": [str(embedding)], "lora": [str(lora)]}, **prompts)  # fmt: skip
    for c in (plain, ti, both):
        generate.run(c)
    p, t, b = manifest(plain), manifest(ti), manifest(both)
    assert "adapters" not in p[0]
    assert t[0]["adapters"] == [f"textual_inversion:{embedding.name}@sha256:" + _sha(embedding)]
    assert [a.split(":")[0] for a in b[0]["adapters"]] == ["lora", "textual_inversion"]
    for x, y in ((p, t), (t, b)):
        assert all(np.abs(pixels(plain if x is p else ti, r) - pixels(ti if x is p else both, s)).max() > 5
                   for r, s in zip(x, y, strict=True))  # fmt: skip
    # A changed embedding file: generate and every stage after it are stale at once (before
    # generate runs again), and every image made with it is made again.
    preprocess.run(ti)
    assert lineage.is_current(ti, "preprocess")
    save_file({"<zero>": torch.randn(1, 32, generator=torch.Generator().manual_seed(1))}, embedding)
    assert "generate" in (lineage.problem(ti, "generate") or "")
    with pytest.raises(DataError, match="generate"):
        preprocess.run(ti)
    assert generate.run(ti).generated == 4
    assert preprocess.run(ti).complete
    # The adapter taken out of the config: its images are not the ones asked for any more
    _, bare = config(tmp_path, tiny_model, "ti.toml", **prompts)
    assert generate.run(bare).generated == 4
    assert all("adapters" not in r for r in manifest(bare))
    assert [r["sha256"] for r in manifest(bare)] == [r["sha256"] for r in p]


def test_records_and_keys_are_the_same_from_any_working_directory(tmp_path, tiny_model,
                                                                  monkeypatch):  # fmt: skip
    """Local paths are the config file's (issue 27 #7); the records name a local model or
    adapter by its file name and its hash, never by the path as seen from here."""
    import os

    import torch
    from safetensors.torch import save_file

    from synthflux.config import load_config

    save_file({"<zero>": torch.randn(1, 32)}, tmp_path / "zero.safetensors")
    path, _ = config(tmp_path, tiny_model, "rel.toml", images_per_class=2, generate={
        "model": os.path.relpath(tiny_model, tmp_path),
        "textual_inversion": ["zero.safetensors"]})  # fmt: skip
    monkeypatch.chdir(tmp_path)
    here = load_config("rel.toml")
    assert generate.run(here).generated == 4
    (tmp_path / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "deeper")
    there = load_config(path)
    assert lineage.is_current(there, "generate")
    assert generate.run(there).generated == 0
    assert manifest(there)[0]["model"] == tiny_model.name


def test_a_changed_dtype_or_a_removed_guide_remakes_the_images(tmp_path, tiny_model, real):
    train, _ = real
    _, text = config(tmp_path, tiny_model, "text.toml", images_per_class=2)
    _, guided = config(tmp_path, tiny_model, "c.toml", images_per_class=2,
                       generate={"init_source": "train"})  # fmt: skip
    ingest.run(guided, train, split="train")
    generate.run(text)
    generate.run(guided)
    _, unguided = config(tmp_path, tiny_model, "c.toml", images_per_class=2)
    assert generate.run(unguided).generated == 4  # real-guided images are not text-only ones
    assert manifest(unguided) == manifest(text)
    _, half = config(tmp_path, tiny_model, "c.toml", images_per_class=2,
                     generate={"dtype": "bfloat16"})  # fmt: skip
    assert generate.run(half).generated == 4
    assert {r["dtype"] for r in manifest(half)} == {"bfloat16"}
    assert generate.run(unguided).generated == 4  # and back to auto


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_lora(model: Path, folder: Path) -> Path:
    """A LoRA for the tiny UNet with random (non-zero) weights, saved as diffusers saves one."""
    import torch
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = AutoPipelineForText2Image.from_pretrained(str(model)).unet
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # (peft starts B at zero: an adapter that changes nothing)
                param.normal_(0, 0.5, generator=gen)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet)
    )
    return folder
