"""The pixel generator: a class-conditional diffusion model in pixel space, trained from
scratch on the real training images (finetune's method "pixel") and sampled by class label
(generate).

A diffusers `UNet2DModel` with a class embedding of K + 1 entries: label K is the "null"
class, given to `null_fraction` of every batch, so one network gives both the conditional and
the unconditional noise estimate (classifier-free guidance, Ho & Salimans 2021). Trained on
pixels in [-1, 1] with a DDPM schedule of 1,000 steps; sampled with DDIM (eta 0: after the
first noise, deterministic). Every training step draws its batch, timesteps, noise and null
labels from a generator seeded by (seed, step) alone, so a fit resumed from a checkpoint at
step s takes exactly the steps an uninterrupted one takes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthflux.config import FinetuneConfig, PipelineConfig

if TYPE_CHECKING:
    import torch

TRAIN_TIMESTEPS = 1000


def build_unet(fit: FinetuneConfig, classes: int, width: int, height: int) -> Any:
    """The UNet, randomly initialised from `fit.seed` (no attention: small images)."""
    import torch
    from diffusers import UNet2DModel

    blocks = len(fit.block_out_channels)
    torch.manual_seed(fit.seed)  # diffusers initialises from the global generator
    return UNet2DModel(
        sample_size=(height, width),
        in_channels=fit.channels,
        out_channels=fit.channels,
        block_out_channels=tuple(fit.block_out_channels),
        layers_per_block=fit.layers_per_block,
        down_block_types=("DownBlock2D",) * blocks,
        up_block_types=("UpBlock2D",) * blocks,
        norm_num_groups=8,
        num_class_embeds=classes + 1,  # + the null class
    )


def noise_schedule() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)


def step_seed(seed: int, step: int) -> int:
    """The seed of training step `step`'s draws: its identity alone, never the run's history."""
    digest = hashlib.sha256(f"{seed}\0pixel-step\0{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W), noised
    timesteps: torch.Tensor
    labels: torch.Tensor  # the null class where dropped
    noise: torch.Tensor  # what the model must predict


def draw_batch(
    data: torch.Tensor, labels: torch.Tensor, fit: FinetuneConfig, step: int, schedule: Any
) -> Batch:
    """Training step `step`'s batch: images, timesteps, noise and dropped labels, drawn from
    its own generator."""
    import torch

    gen = torch.Generator("cpu").manual_seed(step_seed(fit.seed, step))
    n, null = len(data), int(labels.max()) + 1 if len(labels) else 0
    pick = torch.randint(0, n, (fit.batch_size,), generator=gen)
    t = torch.randint(0, TRAIN_TIMESTEPS, (fit.batch_size,), generator=gen)
    noise = torch.randn((fit.batch_size, *data.shape[1:]), generator=gen)
    dropped = torch.rand(fit.batch_size, generator=gen) < fit.null_fraction
    x0 = data[pick]
    return Batch(
        images=schedule.add_noise(x0, noise, t),
        timesteps=t,
        labels=torch.where(dropped, torch.full_like(labels[pick], null), labels[pick]),
        noise=noise,
    )


def save(folder: Path, unet: Any, classes_file: Path, classes: list[str], channels: int) -> None:
    """unet/ and scheduler/ in diffusers' format, and `classes_file` (labels, null label)."""
    unet.save_pretrained(folder / "unet")
    noise_schedule().save_pretrained(folder / "scheduler")
    info = {"method": "pixel", "classes": classes, "null_label": len(classes), "channels": channels}
    classes_file.write_text(json.dumps(info, indent=1) + "\n")


@dataclass
class PixelModel:
    """A fitted pixel model, loaded for sampling."""

    unet: Any
    classes: list[str]
    channels: int
    device: str
    dtype: Any


def load(folder: Path, classes_file: Path, device: str, dtype: Any) -> PixelModel:
    from diffusers import UNet2DModel

    info = json.loads(classes_file.read_text())
    unet = UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(device).eval()
    return PixelModel(unet, list(info["classes"]), int(info["channels"]), device, dtype)


def sample(
    model: PixelModel,
    labels: list[int],
    generators: list[torch.Generator],
    scales: list[float],
    steps: int,
    size: tuple[int, int],
) -> np.ndarray:
    """One batch: uint8 (n, H, W, 3) pixels of the given labels (grey repeated for 1 channel).

    Each image's starting noise comes from its own CPU generator; guidance is per image
    (`scale` <= 1: the conditional estimate alone). The batch is run as one call, so on a CPU
    an image's bytes depend on its batch's shape and its place in it, as in generate's
    canonical batches.
    """
    import torch
    from diffusers import DDIMScheduler

    width, height = size
    scheduler: Any = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, clip_sample=True)
    scheduler.set_timesteps(steps)
    shape = (model.channels, height, width)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators])
    x = x.to(model.device, model.dtype)
    cond = torch.tensor(labels, device=model.device)
    null = torch.full_like(cond, len(model.classes))
    s = torch.tensor(scales, device=model.device, dtype=model.dtype).view(-1, 1, 1, 1)
    guided = any(v > 1 for v in scales)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            if guided:
                both = model.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample
                c, u = both.chunk(2)
                eps = torch.where(s > 1, u + s * (c - u), c)
            else:
                eps = model.unet(x, t, class_labels=cond).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    pixels = pixels.transpose(0, 2, 3, 1)  # (n, H, W, C)
    return np.repeat(pixels, 3, axis=3) if model.channels == 1 else pixels


def training_size(cfg: PipelineConfig) -> tuple[int, int]:
    """(width, height) the model is fitted and sampled at: generate's."""
    return cfg.generate.width, cfg.generate.height
