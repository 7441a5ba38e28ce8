"""Generation overhead: `synthflux generate` vs bare diffusers `pipe(...)` calls, side by side.

Both load the pipeline and make the same images (same model, batch size, steps, size,
per-image generators) in the same process; the bare loop keeps the images in memory,
synthflux also encodes, hashes and writes PNGs + manifest. Rounds alternate the two so that machine noise hits both alike.

    python bench/generate_overhead.py                      # tiny model, CPU
    python bench/generate_overhead.py --sd15-shaped        # SD-1.5-shaped UNet, random weights
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import tomli_w

from synthflux import generate
from synthflux.config import load_config
from synthflux.diffusion import guidance_argument, resolve_model
from synthflux.records import image_seed, plan_batches


def sd15_shaped_model(folder: Path) -> Path:
    """A pipeline with SD 1.5's UNet/VAE/text-encoder shapes and random weights (real cost)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthflux.tiny_model import write_tokenizer_files

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768)  # the defaults are SD 1.5's
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    )
    write_tokenizer_files(folder / "tok")
    tok = CLIPTokenizer(
        str(folder / "tok/vocab.json"), str(folder / "tok/merges.txt"), model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=PNDMScheduler(skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "tok")
    return folder


def bare(cfg, model_path: str) -> float:
    """What a first script would do: load the pipeline, pipe(...) per batch, one generator
    per image, images kept in memory."""
    import torch

    gen = cfg.generate
    batches = [b.jobs for b in plan_batches(cfg)]  # the same calls synthflux makes
    start = time.perf_counter()
    from diffusers import AutoPipelineForText2Image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = AutoPipelineForText2Image.from_pretrained(model_path, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    for batch in batches:
        seeds = [image_seed(cfg.seed, j.class_name, j.index) for j in batch]
        images = pipe(
            prompt=[j.prompt for j in batch],
            negative_prompt=[j.negative_prompt for j in batch] if cfg.negative_prompt else None,
            num_inference_steps=gen.steps,
            guidance_scale=guidance_argument([j.guidance_scale for j in batch]),
            width=gen.width,
            height=gen.height,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images
        assert len(images) == len(batch)  # PIL images, kept in memory only
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def ours(cfg) -> float:
    shutil.rmtree(cfg.data_root / "generated", ignore_errors=True)
    start = time.perf_counter()
    generate.run(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sd15-shaped", action="store_true", help="SD-1.5-sized random model, 512x512"
    )
    parser.add_argument("--images", type=int, default=48, help="images per round (both classes)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="synthflux-bench-"))
    size = 512 if args.sd15_shaped else 32
    model = str(sd15_shaped_model(work / "sd15")) if args.sd15_shaped else "tiny"
    raw = {
        "data_root": str(work / "data"),
        "seed": 1,
        "images_per_class": args.images // 2,
        "classes": [{"name": "a", "prompts": ["a red apple"]}, {"name": "b", "prompts": ["a green pear"]}],
        "generate": {"model": model, "steps": args.steps, "width": size, "height": size, "batch_size": args.batch_size},
    }  # fmt: skip
    (work / "bench.toml").write_text(tomli_w.dumps(raw))
    cfg = load_config(work / "bench.toml")
    path = resolve_model(cfg).path
    bare(cfg, path)  # warm-up: first calls allocate and pick kernels, files get cached
    ours(cfg)
    t_bare, t_ours = [], []
    for _ in range(args.rounds):
        t_bare.append(bare(cfg, path))
        t_ours.append(ours(cfg))
    b, o = statistics.median(t_bare), statistics.median(t_ours)
    n = args.images
    print(f"model: {model if not args.sd15_shaped else 'SD-1.5-shaped, random weights'}, {size}x{size}, "
          f"{args.steps} steps, batch {args.batch_size}, {n} images, median of {args.rounds} rounds")  # fmt: skip
    print(f"bare diffusers pipe(...): {b:8.2f} s  {n / b:8.2f} img/s")
    print(f"synthflux generate:       {o:8.2f} s  {n / o:8.2f} img/s")
    print(f"overhead ratio (synthflux / bare): {o / b:.3f}  (target <= 1.05)")
    print("both include loading the pipeline once; synthflux also encodes, hashes and writes")
    print("every PNG and the manifest, and verifies the model folder and existing files")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
