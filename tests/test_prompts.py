"""Generation settings that make varied training data: guidance drawn per image from a range,
prompt pools drawn per image, prompt files; all recorded per image, all fixed by the seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from synthflux import generate, lineage
from synthflux.config import load_config
from synthflux.diffusion import PerImageGuidance, load_pipeline, resolve_model
from synthflux.records import plan_images, plan_key
from synthflux.storage import ShardSpec

POOLS = {"place": ["on a beach", "in a kitchen", "in the snow"], "light": ["at dawn", "at noon"]}


def records(data: Path) -> list[dict]:
    lines = (data / "generated" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_ranged_guidance_is_drawn_per_image_recorded_and_reproducible(write_config, tmp_path):
    _, cfg_a = write_config(data=tmp_path / "a", generate={"guidance_scale": [1.5, 3.0]})
    _, cfg_b = write_config(data=tmp_path / "b", name="b.toml", generate={"guidance_scale": [1.5, 3.0]})  # fmt: skip
    generate.run(cfg_a)
    generate.run(cfg_b)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    scales = [r["guidance_scale"] for r in a]
    assert all(1.5 <= s <= 3.0 for s in scales) and len(set(scales)) == len(scales)
    assert a == b  # the same draws and the same bytes (sha256) from the same seed
    # Growing a class keeps the earlier images' draws: a draw depends on the image alone.
    _, bigger = write_config(data=tmp_path / "c", name="c.toml", images_per_class=6,
                             generate={"guidance_scale": [1.5, 3.0]})  # fmt: skip
    by_name = {j.name: j.guidance_scale for j in plan_images(bigger)}
    assert all(by_name[r["name"]] == r["guidance_scale"] for r in a)


def test_an_image_made_in_a_mixed_batch_equals_the_one_made_with_its_scale_alone(write_config):
    """PerImageGuidance really applies each image's scale (and scales really matter)."""
    import torch

    _, cfg = write_config()
    pipe = load_pipeline(cfg, resolve_model(cfg))

    def make(scale: float | PerImageGuidance) -> np.ndarray:
        gens = [torch.Generator("cpu").manual_seed(s) for s in (11, 12, 13)]
        out = pipe(prompt=["a cat", "a dog", "a cow"], num_inference_steps=2, guidance_scale=scale,
                   width=32, height=32, generator=gens, output_type="np")  # fmt: skip
        return np.asarray(out.images)

    scales = [1.5, 4.0, 9.0]
    mixed = make(PerImageGuidance(scales))
    alone = [make(s)[i] for i, s in enumerate(scales)]
    for i in range(3):
        np.testing.assert_allclose(mixed[i], alone[i], atol=1e-5)  # float32 batch kernels
    assert np.abs(make(1.5)[1] - alone[1]).max() > 1e-3  # another scale, another image


def test_pools_fill_each_image_prompt_by_its_seed(write_config, tmp_path):
    classes = [
        {"name": "cat", "prompts": ["a cat {place}"]},
        {"name": "dog", "prompts": ["a dog {place}", "a {size} dog"], "variables": {"size": ["big"]}},
    ]  # fmt: skip
    _, cfg = write_config(classes=classes, pools=POOLS, style="photo {light}", images_per_class=12)
    jobs = plan_images(cfg)
    for job in jobs:
        assert "{" not in job.prompt and job.prompt.endswith(("at dawn", "at noon"))
    places = {p for j in jobs for p in POOLS["place"] if p in j.prompt}
    assert places == set(POOLS["place"])  # 24 draws reach every value
    assert any(j.prompt.startswith("a big dog, photo at ") for j in jobs)  # variables still work
    _, again = write_config(data=tmp_path / "again", name="again.toml", classes=classes,
                            pools=POOLS, style="photo {light}", images_per_class=12)  # fmt: skip
    assert [j.prompt for j in plan_images(again)] == [j.prompt for j in jobs]
    _, reseeded = write_config(data=tmp_path / "r", name="r.toml", classes=classes, pools=POOLS,
                               style="photo {light}", images_per_class=12, seed=99)  # fmt: skip
    assert [j.prompt for j in plan_images(reseeded)] != [j.prompt for j in jobs]
    summary = generate.run(cfg, limit=3)
    assert summary.generated == 3
    recs = json.loads(cfg.layout.part(ShardSpec()).read_text().splitlines()[0])
    assert recs["prompt"] == jobs[0].prompt


def test_prompts_file_is_read_beside_the_config_and_part_of_the_key(write_config, tmp_path):
    prompts = tmp_path / "prompts" / "cat.txt"
    prompts.parent.mkdir()
    prompts.write_text("# cats\na cat on a roof\n\na cat in a box\n")
    classes = [{"name": "cat", "prompts_file": "prompts/cat.txt"},
               {"name": "dog", "prompts": ["a dog"]}]  # fmt: skip
    path, cfg = write_config(classes=classes)
    assert cfg.classes[0].all_prompts == ["a cat on a roof", "a cat in a box"]
    cat_prompts = [j.prompt for j in plan_images(cfg) if j.class_name == "cat"]
    assert cat_prompts[:2] == ["a cat on a roof, studio photo", "a cat in a box, studio photo"]
    generate.run(cfg)
    assert lineage.is_current(cfg, "generate")
    prompts.write_text("a cat on a roof\na cat in a tree\n")  # the file changed: so do images
    changed = load_config(path)
    assert plan_key(changed) != plan_key(cfg) and not lineage.is_current(changed, "generate")
    prompts.unlink()
    result = run_cli("generate", str(path))
    assert result.returncode == 2 and "cannot read prompts file" in result.stderr
    assert str(prompts) in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("setting", [{}, {"generate": {"guidance_scale": 2.0}}])
def test_a_single_guidance_value_is_recorded_as_is(write_config, setting):
    _, cfg = write_config(**setting)
    want = setting.get("generate", {}).get("guidance_scale", 7.5)
    assert {j.guidance_scale for j in plan_images(cfg)} == {want}


@pytest.mark.parametrize(
    ("where", "raw", "said"),
    [
        ("prompt", {"classes": [{"name": "a", "prompts": ["x", "a {cat"]},
                                {"name": "b", "prompts": ["y"]}]},
         "classes.0.prompts.1 = 'a {cat': expected '}' before end of string"),
        ("prompt", {"classes": [{"name": "a", "prompts": ["x"]}, {"name": "b", "prompts": ["y}"]}]},
         "classes.1.prompts.0 = 'y}': Single '}' encountered"),
        ("style", {"style": "a } b"}, "style = 'a } b': Single '}' encountered"),
        ("file", {"classes": [{"name": "a", "prompts_file": "p.txt"}, {"name": "b", "prompts": ["y"]}]},
         "classes.0: prompts file {dir}/p.txt line 3 ('bad {x'): expected '}'"),
    ],
)  # fmt: skip
def test_a_lone_brace_is_an_error_naming_the_prompt(tmp_path, where, raw, said) -> None:
    from synthflux.errors import ConfigError

    (tmp_path / "p.txt").write_text("ok\n# a comment\nbad {x\n")
    base = {"classes": [{"name": "a", "prompts": ["x"]}, {"name": "b", "prompts": ["y"]}]}
    path = tmp_path / "c.toml"
    import tomli_w

    path.write_text(tomli_w.dumps({**base, **raw}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert said.replace("{dir}", str(tmp_path)) in str(e.value), where
    assert "(a literal brace is written {{ or }})" in str(e.value)
    assert "(top level)" not in str(e.value)
