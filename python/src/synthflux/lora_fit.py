"""A LoRA per class on the text-to-image model (finetune's method "lora"; DataDream, Kim et
al. 2024): each class's adapter is fitted on that class's real images with its prompts, the
usual noise-prediction loss on the VAE's latents, then generate loads every class's adapter
and makes each canonical batch (one class) with its own.

Classes are independent fits: `--shard I/N` fits class c when c % N == I. A class is done when
DATA/finetuned/model/<class>/fit.json holds its key (fitted.class_keys), written with its
weights under a temp name and renamed in whole.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from synthflux import fitted
from synthflux.config import PipelineConfig
from synthflux.errors import ModelError
from synthflux.prompts import fill, placeholders
from synthflux.storage import ShardSpec, write_json_atomic

if TYPE_CHECKING:
    from synthflux.finetune import FinetuneSummary

log = logging.getLogger("synthflux")

FIT_FILE = "fit.json"  # in a class's folder: the key it was fitted for, written with the weights
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def class_adapter(label: int) -> str:
    """The adapter name of class `label`'s LoRA in a loaded pipeline."""
    return f"class{label}"


def _done(cfg: PipelineConfig, class_name: str, key: str) -> bool:
    try:
        found = json.loads((cfg.layout.fitted_model / class_name / FIT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("key") == key


def classes_left(cfg: PipelineConfig) -> list[str]:
    """The classes without a current fit (every class while the base model is not here)."""
    try:
        base = fitted.base_revision(cfg)
    except Exception:  # not resolvable offline: nothing can be called fitted
        return list(cfg.class_names)
    keys = fitted.class_keys(cfg, base)
    return [c for c in cfg.class_names if not _done(cfg, c, keys[c])]


def fit_classes(cfg: PipelineConfig, shard: ShardSpec, summary: FinetuneSummary) -> None:
    """Fit this task's classes that are not current; write classes.json once all are."""
    from synthflux.diffusion import base_model

    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelError(
            "finetune.method = 'lora' needs the peft package: pip install 'synthflux[lora]'"
        ) from None
    base = base_model(cfg, offline=False)
    assert base is not None
    mine = [c for i, c in enumerate(cfg.class_names) if shard.owns(i)]
    keys = fitted.class_keys(cfg, base.revision)
    todo: list[str] = []
    for name in mine:
        (summary.reused if _done(cfg, name, keys[name]) else todo).append(name)
    if todo:
        parts = _load_parts(cfg, base.path)
        for name in todo:
            _fit_class(cfg, parts, name, keys[name], summary)
    layout = cfg.layout
    for stale in layout.fitted_model.glob("*/"):  # a class no longer in the config
        if stale.is_dir() and stale.name not in cfg.class_names and not stale.name.startswith("."):
            import shutil

            shutil.rmtree(stale)
    if not classes_left(cfg):
        info = {"method": "lora", "classes": cfg.class_names, "base": base.revision}
        write_json_atomic(layout.fitted_classes, info)


# --- loading -------------------------------------------------------------------------------


def _load_parts(cfg: PipelineConfig, path: str) -> Any:
    """The base pipeline on the fit's device; frozen."""
    from diffusers import AutoPipelineForText2Image

    from synthflux.diffusion import pick_device

    device, dtype = pick_device(cfg)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(path, torch_dtype=dtype)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {cfg.generate.model!r} from {path}: {first}") from None
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ModelError(
            f"finetune.method = 'lora' needs a model with a UNet and a VAE (Stable Diffusion "
            f"1.x/2.x-like); generate.model {cfg.generate.model!r} is a {type(pipe).__name__}"
        )
    pipe.to(device)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_class_adapters(pipe: Any, cfg: PipelineConfig) -> None:
    """Every class's LoRA into `pipe`, named class_adapter(label); generate picks one per batch."""
    for label, name in enumerate(cfg.class_names):
        folder = cfg.layout.fitted_model / name
        try:
            pipe.load_lora_weights(str(folder), adapter_name=class_adapter(label))
        except Exception as e:  # diffusers/peft raise many types for a bad adapter
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{folder}: cannot load class {name!r}'s LoRA: {reason}") from None


# --- fitting one class -----------------------------------------------------------------------


def _prompts(cfg: PipelineConfig, class_name: str, n: int) -> list[str]:
    """The prompt of each of the class's n real images: its prompts in turn, styled, pool
    placeholders filled by turn too."""
    spec = cfg.classes[cfg.class_names.index(class_name)]
    styled = [f"{p}, {cfg.style}" if cfg.style else p for p in spec.expanded_prompts()]
    styled = styled or [f"a photo of a {class_name}"]
    out = []
    for i in range(n):
        template = styled[i % len(styled)]
        picks = {k: cfg.pools[k][i % len(cfg.pools[k])] for k in placeholders(template)}
        out.append(fill(template, picks))
    return out


def _latents(cfg: PipelineConfig, pipe: Any, class_name: str) -> Any:
    """The class's real images through the VAE (its mean: deterministic), scaled."""
    import torch

    pixels = torch.from_numpy(fitted.real_pixels(cfg, 3, class_name)[0])
    device, dtype = pipe.unet.device, pipe.vae.dtype
    with torch.no_grad():
        out = []
        for start in range(0, len(pixels), 8):
            chunk = pixels[start : start + 8].to(device, dtype)
            out.append(pipe.vae.encode(chunk).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(out).float()


def _encode(pipe: Any, prompts: list[str]) -> Any:
    ids = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def _add_lora(cfg: PipelineConfig, pipe: Any, label: int) -> list[Any]:
    """A fresh LoRA for this class (its initial weights from the seed and the class alone)."""
    import torch
    from peft import LoraConfig

    fit = cfg.finetune
    assert fit is not None
    torch.manual_seed(fitted_seed(fit.seed, label))
    name = class_adapter(label)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one per class
    pipe.unet.add_adapter(LoraConfig(r=fit.rank, lora_alpha=fit.rank, target_modules=UNET_TARGETS,
                                     init_lora_weights="gaussian"), adapter_name=name)  # fmt: skip
    pipe.unet.set_adapters(name)
    if fit.text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=fit.rank, lora_alpha=fit.rank,
                                                 target_modules=TEXT_TARGETS), adapter_name=name)  # fmt: skip
        pipe.text_encoder.set_adapter(name)
    parts = [pipe.unet] + ([pipe.text_encoder] if fit.text_encoder else [])
    params = [p for part in parts for n, p in part.named_parameters() if name in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def fitted_seed(seed: int, label: int) -> int:
    return int(np.random.SeedSequence([seed, label]).generate_state(1)[0])


def _fit_class(
    cfg: PipelineConfig, pipe: Any, class_name: str, key: str, summary: FinetuneSummary
) -> None:
    import torch
    from diffusers import DDPMScheduler

    from synthflux.fitted import load_checkpoint, loss_note, save_checkpoint
    from synthflux.progress import Progress
    from synthflux.storage import hold_point

    fit, layout = cfg.finetune, cfg.layout
    assert fit is not None
    label = cfg.class_names.index(class_name)
    latents = _latents(cfg, pipe, class_name)
    prompts = _prompts(cfg, class_name, len(latents))
    params = _add_lora(cfg, pipe, label)
    opt = torch.optim.AdamW(params, lr=fit.learning_rate)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    checkpoint = layout.fit_checkpoint(class_name)
    first = _resume(load_checkpoint(checkpoint, key), params, opt, summary, class_name)
    smoothed = None
    with Progress(f"finetune: lora {class_name}", fit.steps, unit="step") as progress:
        progress.update(first)
        for step in range(first, fit.steps):
            loss = _step(cfg, pipe, schedule, latents, prompts, label, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            smoothed = loss_note(smoothed, loss.item())
            summary.steps += 1
            progress.update()
            progress.note(f"loss {smoothed:.4f}")
            if (step + 1) % fit.checkpoint_every == 0 and step + 1 < fit.steps:
                state = {
                    "lora": [p.detach().clone() for p in params],
                    "optimizer": opt.state_dict(),
                }
                save_checkpoint(checkpoint, key, step + 1, state)
    _save_class(cfg, pipe, class_name, key)
    hold_point("fit-class")
    checkpoint.unlink(missing_ok=True)
    summary.fitted.append(class_name)
    summary.loss[class_name] = round(smoothed or 0.0, 6)


def _resume(
    found: dict[str, Any] | None, params: list[Any], opt: Any, summary: FinetuneSummary, name: str
) -> int:
    if found is None:
        return 0
    import torch

    with torch.no_grad():
        for p, saved in zip(params, found["lora"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(found["optimizer"])
    summary.resumed_at[name] = int(found["step"])
    return int(found["step"])


def _step(
    cfg: PipelineConfig, pipe: Any, schedule: Any, latents: Any, prompts: list[str], label: int,
    step: int,
) -> Any:  # fmt: skip
    """One step's loss; its draws (images, timesteps, noise) from (seed, class, step) alone."""
    import torch

    fit = cfg.finetune
    assert fit is not None
    gen = torch.Generator("cpu").manual_seed(fitted_seed(fit.seed, label) ^ step)
    pick = torch.randint(0, len(latents), (fit.batch_size,), generator=gen)
    t = torch.randint(0, schedule.config.num_train_timesteps, (fit.batch_size,), generator=gen)
    noise = torch.randn((fit.batch_size, *latents.shape[1:]), generator=gen)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    noisy = schedule.add_noise(latents[pick], noise, t).to(device, dtype)
    with torch.set_grad_enabled(fit.text_encoder):
        text = _encode(pipe, [prompts[i] for i in pick.tolist()])
    out = pipe.unet(noisy, t.to(device), encoder_hidden_states=text.to(dtype)).sample
    return torch.nn.functional.mse_loss(out.float(), noise.to(device))


def _save_class(cfg: PipelineConfig, pipe: Any, class_name: str, key: str) -> None:
    """The class's LoRA in diffusers' format, with fit.json, renamed into place in whole."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from synthflux.fitted import move_into_place, temp_folder

    fit = cfg.finetune
    assert fit is not None
    name = class_adapter(cfg.class_names.index(class_name))
    final = cfg.layout.fitted_model / class_name
    tmp = temp_folder(final)
    text = (
        get_peft_model_state_dict(pipe.text_encoder, adapter_name=name)
        if fit.text_encoder
        else None
    )
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=name),
        text_encoder_lora_layers=text,
    )  # fmt: skip
    (tmp / FIT_FILE).write_text(json.dumps({"key": key, "class": class_name}) + "\n")
    move_into_place(tmp, final)
    pipe.unet.delete_adapters(name)
    if fit.text_encoder:
        pipe.text_encoder.delete_adapter(name)
