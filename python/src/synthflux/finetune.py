"""finetune: fit the generator to the real training images ([finetune]), before generate.

method "pixel": a class-conditional pixel diffusion model trained from scratch
(pixel_diffusion.py) on one imported training source, at generate's size. method "lora": a
LoRA per class on generate.model, fitted on that class's real images with its prompts
(lora_fit.py); the classes are independent, so `--shard I/N` fits every N-th class.

Each fit saves a checkpoint every `checkpoint_every` steps; every step's draws depend on
(seed, step) alone, so a killed fit re-run ends with the weights an uninterrupted one has
(bit for bit on a CPU). generate then samples the fitted model by itself.

Outputs (DataLayout): finetuned/model/ (pixel: unet/, scheduler/, classes.json; lora: one
<class>/ folder each, pytorch_lora_weights.safetensors and fit.json), finetuned/checkpoints/
while a fit runs, and stage.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from synthflux import devices, fitted, lineage
from synthflux.config import PipelineConfig
from synthflux.errors import ConfigError
from synthflux.fitted import (
    load_checkpoint,
    loss_note,
    move_into_place,
    save_checkpoint,
    temp_folder,
)
from synthflux.layout import DataLayout
from synthflux.progress import Progress
from synthflux.stages import ShardState, Stage, StageState, shard_option
from synthflux.storage import ShardSpec, remove_stale_temps

log = logging.getLogger("synthflux")


@dataclass
class FinetuneSummary:
    method: str
    shard: str
    fitted: list[str] = field(default_factory=list)  # what this run fitted ("pixel", classes)
    reused: list[str] = field(default_factory=list)  # current already
    resumed_at: dict[str, int] = field(default_factory=dict)  # fits taken up from a checkpoint
    steps: int = 0
    seconds: float = 0.0
    loss: dict[str, float] = field(default_factory=dict)  # each fit's last smoothed loss
    complete: bool = False

    def lines(self) -> list[str]:
        out = []
        for name in self.fitted:
            start = self.resumed_at.get(name)
            resumed = f", resumed at step {start}" if start else ""
            out.append(f"{name}: fitted{resumed}, final loss {self.loss.get(name, 0.0):.4f}")
        if self.reused:
            out.append(f"already fitted and current: {', '.join(self.reused)}")
        if self.fitted:
            out.append(f"{self.steps} steps in {self.seconds:.1f}s "
                       f"({self.steps / max(self.seconds, 1e-9):.2f} steps/s)")  # fmt: skip
        state = "complete" if self.complete else "incomplete: other --shard tasks have classes left"
        out.append(f"fitted model ({self.method}): {state}")
        return out


def run(cfg: PipelineConfig, *, shard: ShardSpec | None = None) -> FinetuneSummary:
    """Fit what is missing (resuming from a checkpoint), keep what is current; then publish."""
    shard = shard or ShardSpec()
    fit = cfg.finetune
    if fit is None:
        raise ConfigError("the config has no [finetune] section: nothing to fit")
    if fit.method == "lora" and cfg.generate.devices is not None:
        return _on_devices(cfg, shard)
    key = fitted.key(cfg)  # checks the real source first: a one-line error, nothing written
    summary = FinetuneSummary(fit.method, str(shard))
    if cfg.layout.finetuned.is_dir():
        remove_stale_temps(cfg.layout.finetuned)  # left by a killed run
    start = time.monotonic()
    if fit.method == "pixel":
        if lineage.is_current(cfg, "finetune"):
            summary.reused.append("pixel")
        elif shard.owns(0):  # one fit: task 0's
            _fit_pixel(cfg, key, summary)
    else:
        from synthflux import lora_fit

        lora_fit.fit_classes(cfg, shard, summary)
    summary.seconds = time.monotonic() - start
    summary.complete = _publish(cfg, key, summary)
    return summary


def _on_devices(cfg: PipelineConfig, shard: ShardSpec) -> FinetuneSummary:
    """The per-class LoRA fits, one worker per device; then this process publishes them,
    and the summary says what the workers fitted."""
    fitted.key(cfg)  # a missing real source: one line before any worker starts
    start = time.monotonic()
    fits = devices.spread("finetune", cfg, shard, "finetune: lora")
    summary = run(devices.one_process(cfg), shard=shard)
    summary.fitted = sorted(name for f in fits for name in f["fitted"])
    summary.reused = [name for name in summary.reused if name not in summary.fitted]
    for f in fits:
        summary.resumed_at.update(f["resumed_at"])
        summary.loss.update(f["loss"])
    summary.steps = sum(f["steps"] for f in fits)
    summary.seconds = time.monotonic() - start
    return summary


def _publish(cfg: PipelineConfig, key: str, summary: FinetuneSummary) -> bool:
    """stage.json over every file of the fitted model, once all of it is there."""
    layout = cfg.layout
    if cfg.finetune is not None and cfg.finetune.method == "lora":
        from synthflux import lora_fit

        if lora_fit.classes_left(cfg):  # (each class's fit.json holds its current key)
            return False
    elif not summary.fitted:  # a model this run did not fit is current, or it is not ours
        return lineage.is_current(cfg, "finetune")
    if summary.fitted or not lineage.is_current(cfg, "finetune"):
        files = sorted(p for p in layout.fitted_model.rglob("*") if p.is_file())
        lineage.record(cfg, "finetune", key=key, seconds=summary.seconds, outputs=files,
                       facts={"method": summary.method, "loss": summary.loss})  # fmt: skip
    return True


# --- the pixel fit ---------------------------------------------------------------------------


def _fit_pixel(cfg: PipelineConfig, key: str, summary: FinetuneSummary) -> None:
    import torch

    from synthflux import pixel_diffusion as pd

    fit, layout = cfg.finetune, cfg.layout
    assert fit is not None
    data, labels = (torch.from_numpy(a) for a in fitted.real_pixels(cfg, fit.channels))
    unet = pd.build_unet(fit, len(cfg.class_names), cfg.generate.width, cfg.generate.height)
    opt = torch.optim.AdamW(unet.parameters(), lr=fit.learning_rate)
    ema = [p.detach().clone() for p in unet.parameters()]
    checkpoint = layout.fit_checkpoint("pixel")
    first = _resume(load_checkpoint(checkpoint, key), unet, opt, ema, summary)
    log.info("finetune: fitting the pixel model (%d parameters) on %d real images, %d steps",
             sum(p.numel() for p in unet.parameters()), len(data), fit.steps)  # fmt: skip
    schedule, smoothed = pd.noise_schedule(), None
    unet.train()
    with Progress("finetune: pixel", fit.steps, unit="step") as progress:
        progress.update(first)
        for step in range(first, fit.steps):
            _warm_up(opt, fit.learning_rate, fit.warmup_steps, step)
            batch = pd.draw_batch(data, labels, fit, step, schedule)
            out = unet(batch.images, batch.timesteps, class_labels=batch.labels).sample
            loss = torch.nn.functional.mse_loss(out, batch.noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _average(ema, unet, fit.ema_decay)
            smoothed = loss_note(smoothed, loss.item())
            summary.steps += 1
            progress.update()
            progress.note(f"loss {smoothed:.4f}")
            if (step + 1) % fit.checkpoint_every == 0 and step + 1 < fit.steps:
                state = {"unet": unet.state_dict(), "optimizer": opt.state_dict(), "ema": ema}
                save_checkpoint(checkpoint, key, step + 1, state)
    with torch.no_grad():  # the sampled weights: the moving average
        for p, avg in zip(unet.parameters(), ema, strict=True):
            p.copy_(avg)
    _save_pixel(cfg, unet, layout)
    checkpoint.unlink(missing_ok=True)
    summary.fitted.append("pixel")
    summary.loss["pixel"] = round(smoothed or 0.0, 6)


def _resume(
    found: dict[str, Any] | None, unet: Any, opt: Any, ema: list[Any], summary: FinetuneSummary
) -> int:
    if found is None:
        return 0
    unet.load_state_dict(found["unet"])
    opt.load_state_dict(found["optimizer"])
    for avg, saved in zip(ema, found["ema"], strict=True):
        avg.copy_(saved)
    summary.resumed_at["pixel"] = int(found["step"])
    log.info("finetune: resuming the pixel fit at step %d", found["step"])
    return int(found["step"])


def _warm_up(opt: Any, lr: float, warmup: int, step: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr


def _average(ema: list[Any], model: Any, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights (decay 0: the weights themselves)."""
    import torch

    with torch.no_grad():
        for avg, p in zip(ema, model.parameters(), strict=True):
            avg.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _save_pixel(cfg: PipelineConfig, unet: Any, layout: DataLayout) -> None:
    from synthflux import pixel_diffusion as pd

    assert cfg.finetune is not None
    tmp = temp_folder(layout.fitted_model)
    classes_file = tmp / layout.fitted_classes.name
    pd.save(tmp, unet, classes_file, cfg.class_names, cfg.finetune.channels)
    move_into_place(tmp, layout.fitted_model)


# --- done-ness -------------------------------------------------------------------------------


def state(cfg: PipelineConfig, n: int) -> StageState:
    """Pixel: one fit, done when current. LoRA: classes fitted per task of n (class c is task
    c % n's), complete when the stage is current."""
    if cfg.finetune is None or cfg.finetune.method == "pixel":
        return lineage.one_job_state(cfg, "finetune")
    from synthflux import lora_fit

    left = set(lora_fit.classes_left(cfg))
    shards = [ShardState(i, 0, 0) for i in range(n)]
    for c, name in enumerate(cfg.class_names):
        shards[c % n].total += 1
        shards[c % n].done += name not in left
    why = lineage.problem(cfg, "finetune")
    return StageState("finetune", shards, why is None, why or "")


def _key(cfg: PipelineConfig) -> str:
    return fitted.key(cfg)


STAGE = Stage(
    "finetune", run, key=_key, folder=lambda layout: layout.finetuned,
    results=lambda cfg: [cfg.layout.fitted_classes], state=state, sharded=True, resumes=True,
    uses_gpu=True, spreads=True, unit="fits", product="the fitted generator", applies=lambda cfg: cfg.fits,
    help="fit the generator to the real training images ([finetune]: pixel model or LoRA per class)",
    description="Fit the generator to an imported training source before generate uses it: "
    "method pixel trains a class-conditional pixel diffusion model from scratch at generate's "
    "size (small images, any machine); method lora fits one LoRA per class on generate.model "
    "(a GPU). Writes DATA/finetuned/model/; a checkpoint every finetune.checkpoint_every steps, "
    "so an interrupted fit resumes where it stopped and ends with the same weights.",
    options=(
        shard_option("fit only part I of N: class c goes to part c %% N (lora; the pixel "
                     "model is one fit, made by part 0)"),
    ),
)  # fmt: skip
