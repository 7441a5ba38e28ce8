"""A tiny, randomly initialised Stable Diffusion pipeline (and CLIP model), built offline.

Tests and the demo use it so that they run the very same `from_pretrained` path as real
models, in seconds on a CPU, with nothing downloaded. Its images are noise-like: it is
for plumbing, not pictures.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthflux.storage import public_mode, remove_stale_temps, temp_path

# Byte-level BPE alphabet used by CLIP's tokenizer (GPT-2's bytes_to_unicode).
_PRINTABLE = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
)


def _byte_alphabet() -> list[str]:
    chars, extra = [], 0
    for b in range(256):
        if b in _PRINTABLE:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt for a character-level CLIP tokenizer (no merges learned)."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# The components of diffusers' own pipeline tests (get_dummy_components), as one literal
# configuration read top to bottom.
UNET: dict[str, Any] = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 4,
}
VAE: dict[str, Any] = {
    "block_out_channels": [8, 16],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 4,
}
TEXT_ENCODER: dict[str, Any] = {
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 514,
    "max_position_embeddings": 77,
}
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_tiny_pipeline(seed: int = 0) -> Any:
    """The tiny pipeline: UNET, VAE, TEXT_ENCODER and SCHEDULER, weights seeded by `seed`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):  # seed the weights without touching global state
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        # Positional: transformers 4 names them vocab_file/merges_file, 5 vocab/merges.
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# A CLIP model of the same size for the filter's image-text scores (diffusers' tests' shape).
CLIP_VISION: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                               "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}  # fmt: skip


def build_tiny_clip(seed: int = 0) -> tuple[Any, Any]:
    """(model, processor): a random CLIP with TEXT_ENCODER's text tower and the tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=TEXT_ENCODER, vision_config=CLIP_VISION,
                                     projection_dim=16))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )
    size = CLIP_VISION["image_size"]
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Build the tiny CLIP and save it to `folder` (atomically)."""

    def build(tmp: Path) -> None:
        model, processor = build_tiny_clip(seed)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return _save_atomically(Path(folder), "config.json", build)


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it to `folder` (atomically: a whole model or none)."""

    def build(tmp: Path) -> None:
        build_tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)

    return _save_atomically(Path(folder), "model_index.json", build)


def _save_atomically(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder.parent)  # a half-built model of a killed run
    tmp = temp_path(folder)
    tmp.mkdir()
    try:
        from synthflux.progress import quiet_library_progress

        quiet_library_progress()
        build(tmp)
        public_mode(tmp, directory=True)
        tmp.rename(folder)
    except OSError:
        if (folder / marker).exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
