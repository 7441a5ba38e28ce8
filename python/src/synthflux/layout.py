"""Every folder and file name under the data root, in one place.

No other module builds a data path by hand: a stage asks `DataLayout(root)` for its inputs and
outputs, so the layout below is the whole truth about what lives where (docs/architecture.md).

    DATA/models/tiny/                      the tiny test pipeline; revisions.json: hash cache
    DATA/finetuned/                        finetune: model/ (the fitted generator), checkpoints/
    DATA/generated/<class>/<name>.png      generate (the source "synthetic"): images, parts/,
                                           manifest.jsonl, dropped.jsonl
    DATA/imported/<name>/<class>/...       import: a folder's images, manifest.jsonl, source.json
    DATA/preprocessed/<source>/            preprocess: shard-NNNNN.npz + .json markers,
                                           manifest.jsonl, rejects.jsonl, dataset.json, previews/
    DATA/training/                         train: init-weights.npz, job.args, job.json, run/
                                           (checkpoint.npz, metrics.jsonl, weights.npz)
    DATA/model/weights.npz                 the trained CNN
    DATA/predictions/<source>/             classify: shard-NNNNN.probs.npz; predictions.csv and
                                           summary.json beside the source folders
    DATA/evaluation/                       evaluate: summary.json, predictions.csv
    DATA/report/                           report: index.html and its pictures
    DATA/slurm/                            submit: batch scripts, job logs, submission.json

Every stage folder holds a `stage.json`, written last: the stage's done marker. Each stage
declares its folder (`Stage.folder`, one of the properties below); `run --from` removes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from synthflux.storage import ShardSpec

SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.npz$")
STAGE_FILE = "stage.json"
SYNTHETIC = "synthetic"  # the source generate makes; imported sources have their own names


def shard_file(k: int) -> str:
    """Output shard k's file name: shard-00003.npz."""
    return f"shard-{k:05d}.npz"


def shard_index(name: str) -> int | None:
    """The k of a shard file name, or None if `name` is not one (shard-old.npz, x.probs.npz)."""
    match = SHARD_PATTERN.match(name)
    return int(match.group(1)) if match else None


def probs_file(shard: str) -> str:
    """shard-00003.npz -> shard-00003.probs.npz, the name the classifier writes."""
    return shard.removesuffix(".npz") + ".probs.npz"


def marker_file(shard: str) -> str:
    """shard-00003.npz -> shard-00003.json, the shard's done marker."""
    return shard.removesuffix(".npz") + ".json"


@dataclass(frozen=True)
class DataLayout:
    root: Path

    # --- models -------------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tiny_model(self) -> Path:
        return self.models / "tiny"

    @property
    def tiny_clip(self) -> Path:
        return self.models / "tiny-clip"

    @property
    def revisions(self) -> Path:
        """Local models' revision hashes, cached by file size and mtime."""
        return self.models / "revisions.json"

    # --- finetune -----------------------------------------------------------------------------
    @property
    def finetuned(self) -> Path:
        return self.root / "finetuned"

    @property
    def fitted_model(self) -> Path:
        """The fitted generator (diffusers' format): unet/ + scheduler/ (pixel), or one
        <class>/ LoRA folder per class (lora)."""
        return self.finetuned / "model"

    @property
    def fitted_classes(self) -> Path:
        """The fitted model's classes.json (its labels; written last for a LoRA fit)."""
        return self.fitted_model / "classes.json"

    def fit_checkpoint(self, name: str) -> Path:
        """A fit's last checkpoint ("pixel", or a class's name for its LoRA)."""
        return self.finetuned / "checkpoints" / f"{name}.pt"

    # --- generate -----------------------------------------------------------------------------
    @property
    def generated(self) -> Path:
        return self.root / "generated"

    def image(self, file: str) -> Path:
        """A generated image by its manifest `file` (relative to generated/)."""
        return self.generated / file

    @property
    def parts(self) -> Path:
        return self.generated / "parts"

    def part(self, shard: ShardSpec) -> Path:
        """The records one `generate --shard I/N` made (its done marker)."""
        return self.parts / f"part-{shard.tag}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.generated / "manifest.jsonl"

    @property
    def dropped(self) -> Path:
        return self.generated / "dropped.jsonl"

    @property
    def manifest_lock(self) -> Path:
        return self.generated / ".manifest.lock"

    # --- filter ---------------------------------------------------------------------------------
    @property
    def filtered(self) -> Path:
        return self.root / "filtered"

    @property
    def filtered_manifest(self) -> Path:
        """The generated images the filter kept: the synthetic source's manifest then."""
        return self.filtered / "manifest.jsonl"

    @property
    def filter_scores(self) -> Path:
        """Every generated image's scores, and why it was dropped (if it was)."""
        return self.filtered / "scores.jsonl"

    @property
    def filter_cnn(self) -> Path:
        """The CNN trained on the real training images to score the synthetic ones."""
        return self.filtered / "real-cnn"

    # --- sweep ----------------------------------------------------------------------------------
    @property
    def sweep(self) -> Path:
        return self.root / "sweep"

    def sweep_point(self, name: str) -> Path:
        """A sweep point's own data root."""
        return self.sweep / "points" / name

    def sweep_images(self, key: str) -> Path:
        """The data root where a sweep generates one generation setting's images, once."""
        return self.sweep / f"images-{key}"

    @property
    def sweep_table(self) -> Path:
        return self.sweep / "table.csv"

    @property
    def sweep_plot(self) -> Path:
        return self.sweep / "accuracy.png"

    @property
    def sweep_summary(self) -> Path:
        return self.sweep / "summary.json"

    @property
    def sweep_configs(self) -> Path:
        """Every config that ran a sweep in this data root: what --prune must keep for them."""
        return self.sweep / "configs.json"

    # --- import ---------------------------------------------------------------------------------
    @property
    def imported(self) -> Path:
        return self.root / "imported"

    def source(self, name: str, *, filtered: bool = False) -> SourcePaths:
        """Where a source's images and manifest are: generated/ for the synthetic one (its
        manifest the filter's when `filtered`), imported/<name>/ for a folder of real images."""
        if name == SYNTHETIC:
            return SourcePaths(name, self.generated, self.filtered_manifest if filtered else None)
        return SourcePaths(name, self.imported / name)

    # --- preprocess -------------------------------------------------------------------------
    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    def prepared(self, source: str) -> DatasetPaths:
        """A source's preprocessed dataset: preprocessed/<source>/."""
        return DatasetPaths(self.preprocessed / source)

    # --- train ------------------------------------------------------------------------------
    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def training_run(self) -> Path:
        """The trainer's output folder (checkpoint, metrics, weights): its only writable one."""
        return self.training / "run"

    @property
    def init_weights(self) -> Path:
        return self.training / "init-weights.npz"

    @property
    def job_args(self) -> Path:
        """flux_model.jl's training arguments, one a line, for a trainer started elsewhere."""
        return self.training / "job.args"

    @property
    def training_key(self) -> Path:
        """Which training the run folder belongs to (a checkpoint of another is removed)."""
        return self.training / "job.json"

    @property
    def train_lock(self) -> Path:
        return self.training / ".train.lock"

    @property
    def metrics(self) -> Path:
        """Every epoch's metrics, one JSON line each (the trainer's)."""
        return self.training_run / "metrics.jsonl"

    def trainer_output(self, name: str) -> Path:
        """A file the trainer writes into training/run/: checkpoint.npz, metrics.jsonl, ..."""
        return self.training_run / name

    # --- classify -----------------------------------------------------------------------------
    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def default_weights(self) -> Path:
        return self.model / "weights.npz"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def predicted(self, source: str) -> Path:
        """A source's probabilities: predictions/<source>/shard-NNNNN.probs.npz."""
        return self.predictions / source

    @property
    def predictions_csv(self) -> Path:
        return self.predictions / "predictions.csv"

    @property
    def summary(self) -> Path:
        return self.predictions / "summary.json"

    # --- evaluate ---------------------------------------------------------------------------
    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def evaluation_summary(self) -> Path:
        return self.evaluation / "summary.json"

    @property
    def evaluation_csv(self) -> Path:
        return self.evaluation / "predictions.csv"

    @property
    def baseline(self) -> Path:
        """The real-only baseline's training (evaluate's; synthflux.baseline)."""
        return self.evaluation / "baseline"

    STAGING_PREFIX = ".classify-"  # predictions/.classify-XXXX: one run's raw outputs

    @property
    def classify_lock(self) -> Path:
        """Held by the one classify run of this data root."""
        return self.root / ".classify.lock"

    # --- report and cluster -------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def submission(self) -> Path:
        return self.slurm / "submission.json"

    # --- done markers -------------------------------------------------------------------------
    @staticmethod
    def stage_marker(folder: Path) -> Path:
        """A stage's stage.json in its folder: its timings and what its outputs were made from."""
        return folder / STAGE_FILE

    def relative(self, path: Path) -> str:
        """`path` below the data root, as stage.json lists it and a container sees it."""
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class SourcePaths:
    """One source of images: its files and its manifest (the same record schema for all)."""

    name: str
    folder: Path
    listing: Path | None = None  # its manifest, when not folder/manifest.jsonl (filtered)

    @property
    def manifest(self) -> Path:
        return self.listing or self.folder / "manifest.jsonl"

    @property
    def marker(self) -> Path:
        return self.folder / STAGE_FILE

    def image(self, file: str) -> Path:
        return self.folder / file

    def inside(self, file: str) -> Path | None:
        """The image's path, or None if `file` points outside the source (never opened)."""
        root = self.folder.resolve()
        path = (root / file).resolve()
        return path if path.is_relative_to(root) else None


@dataclass(frozen=True)
class DatasetPaths:
    """One source's preprocessed dataset (docs/architecture.md has the contracts)."""

    folder: Path

    def shard(self, k: int) -> Path:
        return self.folder / shard_file(k)

    def marker(self, k: int) -> Path:
        return self.folder / marker_file(shard_file(k))

    def rows(self, k: int) -> Path:
        """The streamed image rows of shard k before they are packed (a temp name is added)."""
        return self.folder / f"shard-{k:05d}.images.npy"

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.jsonl"

    @property
    def rejects(self) -> Path:
        return self.folder / "rejects.jsonl"

    @property
    def dataset(self) -> Path:
        return self.folder / "dataset.json"

    @property
    def stage_marker(self) -> Path:
        return self.folder / STAGE_FILE

    @property
    def lock(self) -> Path:
        return self.folder / ".dataset.lock"

    @property
    def previews(self) -> Path:
        return self.folder / "previews"

    def preview(self, class_name: str, image_id: int) -> Path:
        return self.previews / f"{class_name}-{image_id:06d}.png"
