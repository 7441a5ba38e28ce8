"""The generator's settings: [generate] (the diffusion model and how it is sampled) and
[finetune] (fitting it to the real images first). Part of the pipeline config (config.py),
whose README section documents every field.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator, model_validator

from synthflux.config_paths import LocalOrHub
from synthflux.device_names import device_list

PositiveInt = Annotated[int, Field(gt=0)]

# Limits of one config: ids are label * 1,000,000 + index (records.py), and a plan of every
# image is held in memory; beyond this, split the classes over several configs.
MAX_IMAGES = 1_000_000


class Strict(BaseModel):
    # strict: TOML has real types, so `images_per_class = true` or `seed = "1234"` is a
    # mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GenerateConfig(Strict):
    # A Hugging Face model id, a local folder, or "tiny" (a random test model built offline).
    model: LocalOrHub = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    # "default" keeps the model's own scheduler (the names map to diffusers classes in generate.py).
    scheduler: Literal["default", "ddim", "pndm", "lms", "euler", "euler_a", "dpm++", "unipc"] = (
        "default"
    )
    steps: PositiveInt = 25
    # Classifier-free guidance: one value, or a range [low, high] each image draws from by its
    # seed. Training data wants low guidance (about 1.5-3: Sariyildiz et al. 2023, Fan et al.
    # 2024): 7.5 (diffusers' default, kept so existing data stays valid) makes prettier images
    # of less variety. 0 or 1 turns guidance off.
    guidance_scale: float | list[float] = 7.5
    width: PositiveInt = 512
    height: PositiveInt = 512
    batch_size: PositiveInt = 4
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Every local device at once: "all" (every visible CUDA GPU) or a list ("cuda:0", "cpu");
    # one worker process each takes its part of the batches (devices.py). None: one process.
    devices: Literal["all"] | list[str] | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = False  # torch.compile the UNet: slower start, faster steps on big runs
    attention_slicing: bool = False  # less GPU memory, a little slower
    cpu_offload: bool = False  # model CPU offload for small GPUs (needs CUDA)
    # What to do with an image the model's safety checker flags.
    on_flagged: Literal["regenerate", "drop"] = "regenerate"
    max_attempts: PositiveInt = 3
    # Real-guided generation (img2img; DA-Fusion, He et al. 2023): each image starts from a real
    # image of its class in this imported training source (image i from the class's real
    # image i mod R), noised by `strength` (1: the real image is ignored). "": text only.
    init_source: str = ""
    strength: FiniteFloat = Field(0.5, gt=0, le=1)
    images_per_real: int = Field(0, ge=0, le=MAX_IMAGES)  # with init_source (0: images_per_class)
    # Adapters loaded into the model, each a local file/folder or a Hub id; their hashes are
    # in every image's record.
    lora: list[LocalOrHub] = Field(default_factory=list)
    textual_inversion: list[LocalOrHub] = Field(default_factory=list)

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _scale_or_range(cls, v: object) -> object:
        # Checked here, whole, so that an error names the field rather than a union member.
        def number(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if number(v):
            if v < 0:  # type: ignore[operator]
                raise ValueError("must be >= 0 (0 or 1 turns guidance off)")
            return float(v)  # type: ignore[arg-type]
        if not (isinstance(v, list) and len(v) == 2 and all(number(x) for x in v)):
            raise ValueError("must be a number or a range [low, high] of two numbers")
        if not 1 <= v[0] <= v[1]:
            raise ValueError(
                f"a range [low, high] needs 1 <= low <= high (at 1 or below guidance is off), got {v}"
            )
        return [float(x) for x in v]

    @field_validator("devices", mode="before")
    @classmethod
    def _device_names(cls, v: object) -> object:
        # Checked here, whole, so that an error names the field rather than a union member.
        if v is None or v == "all":
            return v
        if not (isinstance(v, list) and all(isinstance(name, str) for name in v)):
            raise ValueError('must be "all" or a list of devices such as ["cuda:0", "cuda:1"]')
        return device_list(v)

    @model_validator(mode="after")
    def _guide_settings_need_a_guide(self) -> GenerateConfig:
        if self.images_per_real and not self.init_source:
            raise ValueError(f"images_per_real = {self.images_per_real} needs init_source (the "
                             "real images to start from); without it, images_per_class counts")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_way_to_pick(self) -> GenerateConfig:
        if self.devices is not None and self.device != "auto":
            raise ValueError(f"device = {self.device!r} and devices = {self.devices!r}: "
                             "devices picks them; leave device out")  # fmt: skip
        return self

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be divisible by 8 (the VAE downsamples by 8), got {v}")
        return v


class FinetuneConfig(Strict):
    """Fit the generator to the real training images before generating (the finetune stage).

    pixel: a class-conditional pixel-space diffusion model trained from scratch at generate's
    width x height (small images: digits, CIFAR-sized; any machine, no download). lora: a
    LoRA per class on generate.model, fitted on that class's real images with its prompt
    (DataDream, Kim et al. 2024; wants a GPU)."""

    method: Literal["pixel", "lora"] = "pixel"
    source: str = "train"  # the imported training source (`import --as train --name`)
    steps: int = Field(1000, gt=0, le=10_000_000)  # optimizer steps (lora: per class)
    batch_size: PositiveInt = 64
    lr: FiniteFloat | None = Field(None, gt=0)  # None: 2e-3 for pixel, 1e-4 for lora
    warmup_steps: int = Field(0, ge=0)  # linear warm-up, then constant
    checkpoint_every: PositiveInt = 100  # steps between checkpoints (a killed fit resumes)
    seed: int = Field(0, ge=0, lt=2**63)  # initial weights and every step's draws
    # pixel: the UNet (diffusers UNet2DModel, no attention) and its training
    channels: Literal[1, 3] = 3  # 1: grayscale images (written as RGB PNGs)
    # (at most 4 blocks: 3 halvings, which generate's multiples of 8 always allow)
    block_out_channels: list[PositiveInt] = Field(default=[32, 64], min_length=1, max_length=4)
    layers_per_block: PositiveInt = 1
    # Labels dropped for classifier-free guidance.
    null_fraction: FiniteFloat = Field(0.1, ge=0, lt=1)
    ema_decay: FiniteFloat = Field(0.995, ge=0, lt=1)  # the sampled weights' moving average; 0: off
    # lora
    rank: PositiveInt = 4
    text_encoder: bool = False  # also fit a LoRA on the text encoder

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.method == "pixel" else 1e-4)

    @field_validator("block_out_channels")
    @classmethod
    def _groups(cls, channels: list[int]) -> list[int]:
        if any(c % 8 for c in channels):
            raise ValueError(
                f"each must be a multiple of 8 (the UNet's norm groups), got {channels}"
            )
        return channels
