"""The diffusion model: find it (the tiny test model, a local folder or the Hugging Face Hub),
name its exact revision for the manifest, pick the device, and load the pipeline.

Resolving never loads weights; loading happens only when there are images to make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, overload

from synthflux import fitted
from synthflux.config import PipelineConfig
from synthflux.config_paths import identity, looks_like_hub_id
from synthflux.errors import DataError, ModelError
from synthflux.progress import quiet_library_progress
from synthflux.records import ModelRef
from synthflux.storage import hash_folder, sha256_file

log = logging.getLogger("synthflux")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def _model_scheduler(folder: Path, wanted: str) -> str:
    if wanted != "default":
        return SCHEDULERS[wanted]
    try:
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return str(cfg["_class_name"])
    except (OSError, KeyError, ValueError):
        return "default"


@overload
def resolve_model(cfg: PipelineConfig) -> ModelRef: ...
@overload
def resolve_model(cfg: PipelineConfig, *, offline: bool) -> ModelRef | None: ...


def resolve_model(cfg: PipelineConfig, *, offline: bool = False) -> ModelRef | None:
    """Find the model (building the tiny one, or using the Hugging Face cache) and its
    adapters without loading them. With `offline` (status, on any mount): nothing is built or
    downloaded, and None means the model or an adapter is not available here. With
    [finetune], the fitted model (None before the fit): its revision is in every record."""
    fit_revision = fitted.revision(cfg) if cfg.finetune is not None else None
    if cfg.finetune is not None and fit_revision is None:
        if offline:
            return None
        raise DataError("the fitted model is not there: run `synthflux finetune` first")
    if cfg.pixel_model:
        path = str(cfg.layout.fitted_model)
        return ModelRef(path, "finetuned-pixel", str(fit_revision), "DDIMScheduler")
    ref = base_model(cfg, offline)
    found = adapters(cfg, offline) if ref is not None else None
    if fit_revision is not None and found is not None:  # a LoRA per class
        found = (
            *found,
            f"finetuned-lora:{cfg.layout.relative(cfg.layout.fitted_model)}@{fit_revision}",
        )
    return None if ref is None or found is None else dataclasses.replace(ref, adapters=found)


def base_model(cfg: PipelineConfig, offline: bool) -> ModelRef | None:
    gen = cfg.generate
    layout = cfg.layout
    if gen.model == "tiny":
        from synthflux.tiny_model import save_tiny_model

        if offline and not (layout.tiny_model / "model_index.json").is_file():
            return None
        return _local_ref(save_tiny_model(layout.tiny_model), "tiny", cfg)
    local = Path(gen.model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelError(
                f"generate.model = {gen.model!r} is a folder without model_index.json; "
                "point it at a diffusers pipeline saved with save_pretrained"
            )
        return _local_ref(local, identity(gen.model), cfg)
    if not looks_like_hub_id(gen.model):
        raise ModelError(f"generate.model = {gen.model!r}: no such folder")
    try:
        folder = Path(_download(gen.model, gen.revision, local_only=offline))
    except ModelError:
        if offline:
            return None
        raise
    # A Hub snapshot folder is named after its commit: the exact revision we used.
    if folder.parent.name != "snapshots":
        return _local_ref(folder, gen.model, cfg)
    return ModelRef(str(folder), gen.model, folder.name, _model_scheduler(folder, gen.scheduler))


def _local_ref(folder: Path, name: str, cfg: PipelineConfig) -> ModelRef:
    revision = hash_folder(folder, cfg.layout.revisions)
    return ModelRef(str(folder), name, revision, _model_scheduler(folder, cfg.generate.scheduler))


def adapters(cfg: PipelineConfig, offline: bool = False) -> tuple[str, ...] | None:
    """Each LoRA and textual-inversion adapter as "kind:name@digest" (a local one's sha256, a
    Hub one's commit), for the records; None if one is not available here (`offline`)."""
    gen, found = cfg.generate, []
    for kind, names in (("lora", gen.lora), ("textual_inversion", gen.textual_inversion)):
        for i, name in enumerate(names):
            digest = digest_of(name, f"generate.{kind}[{i}]", cfg, offline)
            if digest is None:
                return None
            found.append(f"{kind}:{identity(name)}@{digest}")
    return tuple(found)


def digest_of(name: str, field: str, cfg: PipelineConfig, offline: bool) -> str | None:
    """What identifies a model file or folder's bytes: its sha256 (a folder's cached by size
    and mtime), or a Hub id's commit; None when offline and not in the local cache."""
    local = Path(name).expanduser()
    if local.is_file():
        return "sha256:" + sha256_file(local)
    if local.is_dir():
        return hash_folder(local, cfg.layout.revisions)
    if not looks_like_hub_id(name) or "/" not in name:
        raise ModelError(f"{field} = {name!r}: no such file or folder (nor a Hub id, owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=offline)).name  # the commit
    except Exception as e:  # huggingface_hub raises many types; all mean "cannot get it"
        if offline:
            return None
        raise ModelError(f"{field} = {name!r}: cannot get it from the Hub ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None  # fmt: skip


def _load_adapters(pipe: Any, cfg: PipelineConfig) -> None:
    gen = cfg.generate
    for kind, names in (("lora", gen.lora), ("textual_inversion", gen.textual_inversion)):
        for i, name in enumerate(names):
            local = Path(name).expanduser()
            where = str(local) if local.exists() else name
            try:
                if kind == "lora":
                    pipe.load_lora_weights(where, adapter_name=f"lora{i}")
                else:
                    pipe.load_textual_inversion(where)
            except Exception as e:  # diffusers/peft raise many types for a bad adapter
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                hint = (
                    " (LoRA needs the peft package: pip install peft)" if "PEFT" in reason else ""
                )
                raise ModelError(
                    f"generate.{kind}[{i}] = {name!r}: cannot load it: {reason}{hint}"
                ) from None


def _download(model_id: str, revision: str | None, local_only: bool = False) -> str:
    """Resolve a Hub id to a local snapshot (downloading it unless HF_HUB_OFFLINE is set or
    `local_only`)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its warnings repeat what our one-line error says
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return str(
            DiffusionPipeline.download(model_id, revision=revision, local_files_only=local_only)
        )
    except Exception as e:  # huggingface_hub raises many types; all mean "cannot get it"
        hint = (
            "it is not in the local cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to "
            "allow downloads, or set generate.model to a local folder"
            if offline
            else "check the id, run `huggingface-cli login` if the model is gated, or set "
            "generate.model to a local folder (or HF_HOME to a cache that has it)"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot get model {model_id!r}: {hint} ({type(e).__name__}: {reason})"
        ) from None


def pick_device(cfg: PipelineConfig) -> tuple[str, Any]:
    import torch

    gen = cfg.generate
    device = gen.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "generate.device = 'cuda' but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'"
        )
    dtype = gen.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


# Within `pipelines_kept()` (a sweep making several settings' images with one model): the
# last pipeline loaded, by what it was loaded with. Outside, none is kept: a run frees it.
_kept: dict[tuple[Any, ...], Any] | None = None


@contextlib.contextmanager
def pipelines_kept() -> Iterator[None]:
    """Generate calls inside reuse a pipeline loaded with the same model, adapters,
    scheduler and device (guidance, steps, size are per call) instead of loading it again;
    it is released on leaving."""
    global _kept
    _kept = {}
    try:
        yield
    finally:
        _kept = None


def kept_pipeline(cfg: PipelineConfig, model: ModelRef, load: Callable[[], Any]) -> Any:
    """`load()`, or within `pipelines_kept()` the pipeline it gave for the same loading."""
    gen = cfg.generate
    how = (model, pick_device(cfg), gen.scheduler, bool(gen.init_source), gen.attention_slicing,
           gen.cpu_offload, gen.compile, cfg.finetune and cfg.finetune.model_dump_json())  # fmt: skip
    if _kept is not None and how in _kept:
        return _kept[how]
    pipe = load()
    if _kept is not None:
        _kept.clear()  # one at a time: a model's memory is the limit
        _kept[how] = pipe
    return pipe


def load_pipeline(cfg: PipelineConfig, model: ModelRef) -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import diffusers
    from diffusers import AutoPipelineForText2Image

    device, dtype = pick_device(cfg)
    if cfg.pixel_model:
        from synthflux import pixel_diffusion

        return pixel_diffusion.load(Path(model.path), cfg.layout.fitted_classes, device, dtype)
    gen = cfg.generate
    quiet_library_progress()
    # Its warnings (a cut prompt dumped token by token, deprecations) are said once in our
    # words where they matter (generate.model_prompts).
    diffusers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older lack `dtype`
            warnings.simplefilter("ignore", FutureWarning)
            pipe = AutoPipelineForText2Image.from_pretrained(model.path, torch_dtype=dtype)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {model.name!r} from {model.path}: {first}") from None
    if gen.scheduler != "default":
        scheduler_cls = getattr(diffusers, SCHEDULERS[gen.scheduler])
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if gen.init_source:  # real-guided: the same components, started from real images
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)
    _load_adapters(pipe, cfg)
    if gen.attention_slicing:
        pipe.enable_attention_slicing()
    if gen.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if gen.compile:
        import torch

        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_prompts(pipe: Any, prompts: set[str]) -> dict[str, str]:
    """What the model reads of each prompt; a prompt its text encoder must cut is said once.

    CLIP reads at most 77 tokens (75 after its start and end markers): the rest, often the
    style suffix, is silently dropped by diffusers. The record keeps what the model saw.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    seen = {p: p for p in prompts}
    if tokenizer is None:
        return seen
    limit = int(tokenizer.model_max_length)
    for prompt in sorted(prompts):
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True).strip()
        seen[prompt] = kept
        cut = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
        log.warning(
            "generate: prompt %r is %d tokens, the model reads %d: it sees %r; cut: %r "
            "(shorten the prompt or the style)", prompt, len(ids) - 2, limit - 2, kept, cut,
        )  # fmt: skip
    return seen


class PerImageGuidance(float):
    """Classifier-free guidance with a scale per image of the batch, for diffusers pipelines.

    The pipeline compares its scale as a number (`> 1` turns guidance on) and mixes with
    `scale * (text - uncond)`: this float is the batch's largest scale for the first, and
    multiplies a (batch, ...) tensor row by row for the second. tests/test_generate.py checks
    that an image made in a mixed batch equals the one made with its scale alone.
    """

    scales: tuple[float, ...]

    def __new__(cls, scales: list[float]) -> PerImageGuidance:
        obj = super().__new__(cls, max(scales))
        obj.scales = tuple(scales)
        return obj

    def __mul__(self, other: Any) -> Any:
        import torch

        if isinstance(other, torch.Tensor) and other.dim() and other.shape[0] == len(self.scales):
            rows = torch.tensor(self.scales, dtype=other.dtype, device=other.device)
            return other * rows.view(-1, *[1] * (other.dim() - 1))
        return float(self) * other

    __rmul__ = __mul__


def guidance_argument(scales: list[float]) -> float:
    """What to pass as `guidance_scale` for a batch: a plain float when every image has the
    same scale (the same call as ever), else a PerImageGuidance."""
    return scales[0] if len(set(scales)) == 1 else PerImageGuidance(scales)
