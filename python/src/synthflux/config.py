"""The pipeline config: one TOML file, validated here, that drives every stage.

Every field is documented in README.md ("Config reference"); examples live in examples/.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    FiniteFloat,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from synthflux.config_paths import DataRoot, LocalOrHub, LocalPath
from synthflux.errors import ConfigError, describe
from synthflux.generation_config import (  # re-exported: every stage imports from here
    MAX_IMAGES as MAX_IMAGES,
)
from synthflux.generation_config import (
    FinetuneConfig as FinetuneConfig,
)
from synthflux.generation_config import (
    GenerateConfig as GenerateConfig,
)
from synthflux.generation_config import PositiveInt, Strict
from synthflux.layout import DataLayout
from synthflux.prompts import checked, fill, placeholders, read_prompts_file
from synthflux.weights import DEFAULT_BLOCKS, DEFAULT_KERNEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A prompt: `{name}` placeholders, braces well formed (checked where the field is named).
Template = Annotated[str, AfterValidator(checked)]

# A class name becomes a folder name: letters, digits, '-', '_', '.', no leading dot.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# docker/local run julia/flux_model.jl; "reference" runs its PyTorch twin in-process (no Julia
# needed: demos, laptops, clusters without containers); "none" runs nothing and collects the
# probabilities another process wrote into DATA/predictions (compose's julia service).
Backend = Literal["auto", "docker", "local", "reference", "none"]
BACKENDS: tuple[str, ...] = get_args(Backend)


MAX_SIDE = 4096  # preprocess width/height: a classifier's input, not a photo's
MIN_STD = 1e-6  # preprocess std: pixels are divided by it


class ClassSpec(Strict):
    """One class: its name (also its folder) and the prompts that describe it."""

    name: str
    # Needed to generate the class's images; a class only imported (real photos) needs none.
    prompts: list[Template] = Field(default_factory=list)
    # More prompts, one per line ('#' starts a comment), relative to the config file's folder.
    prompts_file: LocalPath = ""
    # Template variables: "a {color} cat" with color = ["black", "white"] gives two prompts.
    variables: dict[str, list[str]] = Field(default_factory=dict)
    images: Annotated[int, Field(gt=0, le=MAX_IMAGES)] | None = None  # overrides images_per_class
    _file_prompts: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not SAFE_NAME.match(name) or ".." in name:
            raise ValueError(
                "must be 1-64 letters, digits, '-', '_' or '.', not start with '.', "
                "and contain no '..' or '/' (it names a folder)"
            )
        return name

    @model_validator(mode="after")
    def _read_prompts_file(self, info: ValidationInfo) -> ClassSpec:
        if self.prompts_file:
            self._file_prompts = read_prompts_file(Path(self.prompts_file))
        for var, values in self.variables.items():
            if not values:
                raise ValueError(f"variables.{var} is empty")
        return self

    @property
    def all_prompts(self) -> list[str]:
        """The config's prompts, then the prompt file's."""
        return self.prompts + self._file_prompts

    def expanded_prompts(self) -> list[str]:
        """Every prompt with every combination of its variables, in a fixed order. Pool
        placeholders stay in: each image fills them with its own draw (records.py)."""
        out = []
        for prompt in self.all_prompts:
            used = sorted(set(placeholders(prompt)) & set(self.variables))
            for combo in itertools.product(*(self.variables[v] for v in used)):
                out.append(fill(prompt, dict(zip(used, combo, strict=True))))
        return out


class PreprocessConfig(Strict):
    # At most MAX_SIDE: a shard row is width x height x channels float32s.
    width: PositiveInt = Field(64, le=MAX_SIDE)
    height: PositiveInt = Field(64, le=MAX_SIDE)
    channels: Literal[1, 3] = 1  # 1 = grayscale, 3 = RGB
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = "lanczos"
    # stretch: ignore the aspect ratio; crop: center-crop to it; pad: letterbox with pad_value.
    aspect: Literal["stretch", "crop", "pad"] = "crop"
    pad_value: FiniteFloat = Field(0.0, ge=0, le=1)
    # After scaling to [0, 1]: x = (x - mean) / std, one value per channel.
    mean: list[FiniteFloat] = Field(default_factory=lambda: [0.5])
    std: list[FiniteFloat] = Field(default_factory=lambda: [0.5])
    shard_size: PositiveInt = 1000
    workers: int = Field(0, ge=0)  # 0 = one per CPU core
    max_pixels: PositiveInt = 64_000_000  # larger images are rejected as decompression bombs

    @model_validator(mode="after")
    def _per_channel(self) -> PreprocessConfig:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {values}")
        if any(s < MIN_STD for s in self.std):  # below it, float32 pixels overflow
            raise ValueError(f"std must be > 0 (at least {MIN_STD:g}), got {self.std}")
        return self


class TrainConfig(Strict):
    """Training the CNN (docs/training.md has the exact rules, the same in both languages)."""

    # "synthetic": the generated images; "real": every source imported with --as train.
    sources: list[Literal["synthetic", "real"]] = Field(default=["synthetic"], min_length=1)
    epochs: int = Field(10, ge=0, le=100_000)  # 0: the initial weights are the model
    batch_size: PositiveInt = 32
    lr: FiniteFloat = Field(1e-3, gt=0)
    betas: list[FiniteFloat] = Field(default=[0.9, 0.999], min_length=2, max_length=2)
    eps: FiniteFloat = Field(1e-8, gt=0)
    weight_decay: FiniteFloat = Field(0.0, ge=0)  # decoupled (AdamW)
    val_fraction: FiniteFloat = Field(0.1, ge=0, lt=1)  # chosen per image by a hash of its id
    patience: int = Field(3, ge=0)  # epochs without a better val loss before stopping; 0: never
    seed: int = Field(0, ge=0, lt=2**63)  # initial weights, split, order, augmentation
    flip: bool = False  # augmentation: random horizontal flips
    shift: int = Field(0, ge=0, le=16)  # augmentation: random shifts by up to this many pixels
    kernel: int = Field(DEFAULT_KERNEL, ge=1)  # the CNN: odd kernel size ...
    blocks: list[PositiveInt] = Field(default=list(DEFAULT_BLOCKS), min_length=1)  # ... channels
    timeout_s: PositiveInt = 86_400
    # Without "real" in sources: evaluate also trains this network on the real training
    # images alone (the PyTorch twin) and shows its test accuracy beside (synthflux.baseline).
    baseline: bool = True

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {betas}")
        return betas

    @field_validator("kernel")
    @classmethod
    def _odd(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError(f"must be odd (pad k//2 keeps the size), got {kernel}")
        return kernel


class CnnConfig(Strict):
    """Where the CNN runs -- train, classify and evaluate alike -- and with what resources."""

    # auto: docker if the Julia image is there and the engine answers, else local if a julia
    # with Flux and NPZ loads, else reference (synthflux.backends.choose says which, and why).
    backend: Backend = "auto"
    image: str = "synthflux-julia:latest"
    julia: str = "julia"  # the executable for the local backend
    batch_size: PositiveInt = 64  # images per forward pass when classifying
    memory: str = Field("4g", pattern=r"^[0-9]+[bkmgBKMG]?$")  # container memory limit, e.g. 512m
    cpus: FiniteFloat = Field(2.0, gt=0)  # container CPU limit
    timeout_s: PositiveInt = 3600  # one classify run (training has train.timeout_s)
    # Where the Python driver runs inside compose, the data lives on this named volume.
    volume: str = ""


class FilterConfig(Strict):
    """Which generated images reach training: the filter stage scores every image, drops the
    ones below a bar and keeps each class's best. Nothing set: every image is kept."""

    # Near-duplicates within a class: a 64-bit perceptual hash (imagehash.phash) at most this
    # many bits from an image kept before it (in index order). -1: duplicates are kept.
    max_hash_distance: int = Field(-1, ge=-1, le=64)
    # A CNN trained on the real training images (`import --as train`; [train]'s settings and
    # network) gives each synthetic image a probability of its class: drop those below.
    min_real_confidence: FiniteFloat = Field(0.0, ge=0, le=1)
    # Per class, keep only the best this many: by the real CNN's probability when real images
    # were imported for training, else by CLIP's, else by index. 0: no cap.
    keep_top: int = Field(0, ge=0, le=MAX_IMAGES)
    # CLIP (a local folder, a Hub id, or "tiny": a random test model built offline) scores
    # each image against its own prompt (CLIPScore: 100 x cosine, Hessel et al. 2021) and
    # gives its class's zero-shot probability among "a photo of a <class>". "": not scored.
    clip_model: LocalOrHub = ""
    min_clip_score: FiniteFloat = Field(0.0, ge=0, le=100)
    min_clip_confidence: FiniteFloat = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _clip_rules_need_clip(self) -> FilterConfig:
        for name in ("min_clip_score", "min_clip_confidence"):
            if getattr(self, name) and not self.clip_model:
                raise ValueError(f"{name} = {getattr(self, name)} needs clip_model (the CLIP "
                                 'that scores the images; "tiny" to try it offline)')  # fmt: skip
        return self

    @property
    def needs_real(self) -> bool:
        """Whether it must train a CNN on real images (a real import is required)."""
        return self.min_real_confidence > 0

    @property
    def may_use_real(self) -> bool:
        """Whether it uses real images when some were imported (keep_top ranks by them)."""
        return self.needs_real or self.keep_top > 0


class ClassifyConfig(Strict):
    # weights.npz for the CNN; empty = DATA/model/weights.npz, the trained model.
    weights: LocalPath = ""


class PipelineConfig(Strict):
    # A TOML string; relative to the config file's folder, like every path in a config.
    data_root: Annotated[Path, Field(strict=False, validate_default=True), DataRoot] = Path("data")
    seed: int = Field(0, ge=0, lt=2**63)
    images_per_class: int = Field(8, gt=0, le=MAX_IMAGES)
    style: Template = ""  # appended to every prompt: "<prompt>, <style>"
    negative_prompt: str = ""
    # Prompt pools: a prompt or the style using {context} gets, per image, one value of
    # pools.context drawn by the image's seed (varied scenes: He et al. 2023's diverse prompts).
    pools: dict[str, list[str]] = Field(default_factory=dict)
    classes: list[ClassSpec] = Field(min_length=2)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    # Present: the filter stage runs between generate and preprocess.
    filter: FilterConfig | None = None
    # Present: the finetune stage fits the generator to real images, and generate uses it.
    finetune: FinetuneConfig | None = None
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    cnn: CnnConfig = Field(default_factory=CnnConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("classes")
    @classmethod
    def _unique_names(cls, classes: list[ClassSpec]) -> list[ClassSpec]:
        seen: dict[str, str] = {}
        for c in classes:
            key = c.name.lower()  # case-insensitive: the folders must not clash on macOS
            if key in seen:
                raise ValueError(f"class name {c.name!r} repeats {seen[key]!r}")
            seen[key] = c.name
        return classes

    @model_validator(mode="after")
    def _known_placeholders(self) -> PipelineConfig:
        for name, values in self.pools.items():
            if not values:
                raise ValueError(f"pools.{name} is empty")
        for field in placeholders(self.style):
            if field not in self.pools:
                raise ValueError(f"style {self.style!r} uses {{{field}}} but pools has "
                                 f"{sorted(self.pools) or 'none'}")  # fmt: skip
        for i, spec in enumerate(self.classes):
            for prompt in spec.all_prompts:
                for field in placeholders(prompt):
                    if field not in spec.variables and field not in self.pools:
                        raise ValueError(
                            f"classes.{i}: prompt {prompt!r} uses {{{field}}} but variables has "
                            f"{sorted(spec.variables) or 'none'} and pools has "
                            f"{sorted(self.pools) or 'none'}"
                        )
        return self

    @model_validator(mode="after")
    def _prompts_to_generate(self) -> PipelineConfig:
        if self.generates and not self.pixel_model:  # the pixel model draws by class label
            for i, c in enumerate(self.classes):
                if not c.all_prompts:
                    raise ValueError(
                        f"classes.{i}.prompts is empty: class {c.name!r} needs prompts to "
                        "generate its images (or train on real images only: train.sources = "
                        '["real"])'
                    )
        return self

    @property
    def generates(self) -> bool:
        """Whether this config makes synthetic images (it trains on them)."""
        return "synthetic" in self.train.sources

    @model_validator(mode="after")
    def _not_too_many(self) -> PipelineConfig:
        total = sum(self.images_for(c) for c in self.classes)
        if total > MAX_IMAGES:
            raise ValueError(
                f"{total:,} images in all (at most {MAX_IMAGES:,} per config): split the "
                "classes over several configs and data roots"
            )
        return self

    @model_validator(mode="after")
    def _blocks_fit_the_image(self) -> PipelineConfig:
        side, n = min(self.preprocess.width, self.preprocess.height), len(self.train.blocks)
        if side >> n < 1:  # each block's MaxPool halves the image
            raise ValueError(
                f"train.blocks has {n} blocks, each halving the image, but preprocess "
                f"width/height is {self.preprocess.width}x{self.preprocess.height}: use at "
                f"most {side.bit_length() - 1} blocks or images of at least {2**n} pixels a side"
            )
        return self

    @model_validator(mode="after")
    def _fits(self) -> PipelineConfig:
        fit, gen = self.finetune, self.generate
        if fit is None:
            return self
        clash = [k for k in ("init_source", "lora", "textual_inversion") if getattr(gen, k)]
        if clash:
            raise ValueError(
                f"finetune: generate.{clash[0]} = {getattr(gen, clash[0])!r} cannot be combined "
                f"with [finetune] (the fitted model is what generate uses): remove one"
            )
        return self

    @property
    def pixel_model(self) -> bool:
        """Whether generate samples the pixel model fitted by the finetune stage."""
        return self.finetune is not None and self.finetune.method == "pixel"

    @property
    def fits(self) -> bool:
        """Whether the finetune stage runs: the config makes images and has a [finetune]."""
        return self.generates and self.finetune is not None

    @property
    def filters(self) -> bool:
        """Whether the filter stage runs: the config makes images and has a [filter]."""
        return self.generates and self.filter is not None

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def images_for(self, spec: ClassSpec) -> int:
        return spec.images or self.images_per_class

    @property
    def layout(self) -> DataLayout:
        """Every path under the data root (synthflux.layout)."""
        return DataLayout(self.data_root)

    def with_cnn(self, *, backend: str | None = None, image: str | None = None) -> PipelineConfig:
        """The config with the command line's --backend / --image applied to [cnn]."""
        update = {k: v for k, v in (("backend", backend), ("image", image)) if v is not None}
        if not update:
            return self
        if "backend" in update and update["backend"] not in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not one of: {', '.join(BACKENDS)}")
        return self.model_copy(update={"cnn": self.cnn.model_copy(update=update)})


def _moved(raw: dict[str, object], path: Path) -> None:
    """[classify] backend/image/... moved to [cnn]: say so, rather than 'unknown setting'."""
    section = raw.get("classify")
    if isinstance(section, dict):
        for key in section:
            if key in CnnConfig.model_fields:
                raise ConfigError(
                    f"{path}: classify.{key} moved to [cnn] {key} (the CNN's runtime settings "
                    "have their own section: training runs there too)"
                )


def validate(
    raw: dict[str, Any], path: Path, data_root: str | Path | None = None
) -> PipelineConfig:
    """A config from its TOML table; `path` names it in errors and anchors its paths.
    `data_root` (--data, a sweep point's) replaces the file's, relative to the working
    directory."""
    _moved(raw, path)
    context = {"config_dir": path.parent, "anchor_data_root": data_root is None}
    if data_root is not None:
        raw = {**raw, "data_root": str(data_root)}
    try:
        return PipelineConfig.model_validate(raw, context=context)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe(e, PipelineConfig)}") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        return raw
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(
    path: str | Path,
    data_root: str | Path | None = None,
    devices: str | list[str] | None = None,
) -> PipelineConfig:
    """Read and validate a pipeline config; `data_root` (--data) and `devices` (--devices)
    override the file's."""
    path = Path(path)
    raw = with_devices(read_toml(path), devices)
    raw.pop("sweep", None)  # `synthflux sweep`'s own section: sweep.py reads it
    cfg = validate(raw, path, data_root)
    if cfg.data_root.exists() and not cfg.data_root.is_dir():
        raise ConfigError(f"data root {cfg.data_root} exists and is not a folder")
    return cfg


def with_devices(raw: dict[str, Any], devices: str | list[str] | None) -> dict[str, Any]:
    """The TOML table with --devices as its `[generate] devices` (checked with the rest)."""
    if devices is not None:
        generate = raw.get("generate")
        raw["generate"] = {**(generate if isinstance(generate, dict) else {}), "devices": devices}
    return raw
