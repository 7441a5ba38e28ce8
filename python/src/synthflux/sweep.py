"""`synthflux sweep`: how many synthetic images one real image is worth, and which settings help.

The config's `[sweep]` names a grid: synthetic images per class (`images`), what the CNN
learns from (`sources`: synthetic, real, both) and settings to vary (`vary`, dotted names).
Each point is a whole `synthflux run` in a data root of its own, DATA/sweep/points/<point>/,
sharing what it can: the images of one generation setting are generated once, at the grid's
largest N, in DATA/sweep/images-<key>/; a point of N per class links the first N of each class
(an image's seed depends on its class and index alone, so they are the images a run of N
makes; generate remakes only a last, partial batch, whose shape differs); imported folders
and a fitted generator are linked. Points whose whole chain is current are skipped, so a sweep
resumes; `--shard I/N` runs every N-th point (a Slurm array), after `--only-generate`.
Outputs: DATA/sweep/table.csv, accuracy.png (test accuracy against N, the real-only baseline
as a line) and summary.json (the table and "one real image ≈ k synthetic").
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from synthflux import devices as local_devices
from synthflux import generate, lineage
from synthflux.config import PipelineConfig, read_toml, validate, with_devices
from synthflux.diffusion import pipelines_kept
from synthflux.errors import ConfigError, DataError, describe
from synthflux.layout import DataLayout
from synthflux.records import count_records, plan_images, plan_key
from synthflux.sources import imported
from synthflux.storage import ShardSpec, file_lock, write_json_atomic
from synthflux.sweep_grid import TRAINS_ON, Point, SweepConfig, check_vary, runs_as
from synthflux.sweep_table import publish

log = logging.getLogger("synthflux")


@dataclass(frozen=True)
class Plan:
    base: PipelineConfig  # the config as written (its data root holds the sweep)
    points: list[tuple[Point, PipelineConfig]]
    images: dict[str, PipelineConfig]  # per generation setting: its config at the largest N


def plan(
    path: Path, data_root: str | Path | None = None, devices: str | list[str] | None = None
) -> Plan:
    """Every point's config, and where each generation setting's images are made."""
    raw = with_devices(read_toml(path), devices)
    if "sweep" not in raw:
        raise ConfigError(f"{path} has no [sweep] section: nothing to sweep (README: the "
                          "[sweep] grid)")  # fmt: skip
    try:
        grid = SweepConfig.model_validate(raw.pop("sweep", {}))
    except ValidationError as e:
        raise ConfigError(f"{path}: sweep.{describe(e, SweepConfig)}") from None
    base = validate(copy.deepcopy(raw), path, data_root)
    check_vary(grid, path)
    combos = itertools.product(*grid.vary.values())
    points = [
        Point(src, 0 if src == "real" else n, tuple(zip(grid.vary, combo, strict=True)))
        for combo in combos
        for src in grid.sources
        for n in ([0] if src == "real" else sorted(set(grid.images)))
    ]
    configs = [(p, _point_config(raw, path, runs_as(p), base.layout)) for p in points]
    for p, cfg in configs:
        if p.images and cfg.generate.init_source and cfg.generate.images_per_real:
            raise ConfigError(
                f"{path}: sweep point {p.name}: generate.images_per_real = "
                f"{cfg.generate.images_per_real} makes that many images per real image whatever "
                "sweep.images says: set it to 0 (each point then makes sweep.images per class)"
            )
    images: dict[str, PipelineConfig] = {}
    for point, cfg in configs:
        if cfg.generates:
            key = _generation_key(cfg, base)
            if key not in images or images[key].images_per_class < point.images:
                root = base.layout.sweep_images(key)
                images[key] = cfg.model_copy(update={"data_root": root})
    return Plan(base, configs, images)


def _point_config(
    raw: dict[str, Any], path: Path, point: Point, layout: DataLayout
) -> PipelineConfig:
    raw = copy.deepcopy(raw)
    for dotted, value in point.settings:
        *sections, name = dotted.split(".")
        table = raw
        for section in sections:
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: sweep.vary: {dotted!r} is not a setting")
        table[name] = copy.deepcopy(value)  # (a point's table is its own: the sweep adds to it)
    raw.setdefault("train", {})["sources"] = TRAINS_ON[point.sources]
    raw["train"]["baseline"] = False  # the sweep's own real-only points are the baseline
    if point.images:
        raw["images_per_class"] = point.images
        for spec in raw.get("classes", []):
            spec.pop("images", None)  # one N for every class: the sweep's
    try:
        return validate(raw, path, layout.sweep_point(point.name))
    except ConfigError as e:
        raise ConfigError(f"sweep point {point.name}: {e}") from None


def _generation_key(cfg: PipelineConfig, base: PipelineConfig) -> str:
    """What the images depend on, whatever the number per class (real images to start from
    are read where they were imported: the base data root)."""
    one = cfg.model_copy(update={"images_per_class": 1, "data_root": base.data_root})
    return plan_key(one, fitted_files=False)[:12]  # (the fit is made in the images' root)


# --- running ---------------------------------------------------------------------------------


def run(
    path: Path,
    *,
    data_root: str | Path | None = None,
    shard: ShardSpec | None = None,
    only_generate: bool = False,
    devices: str | list[str] | None = None,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]] | None:
    """Generate the images, run the points (this shard's), and, once every point is done,
    write the table and the plot. Returns the table's rows, or None while points remain."""
    grid = plan(Path(path), data_root, devices)
    if grid.base.generate.devices is not None and grid.images:
        local_devices.resolve(grid.base.generate.devices)  # said before anything runs
    _register(grid.base.layout, Path(path))
    with pipelines_kept():  # settings of one model share its pipeline, loaded once
        _make_images(grid, shard, only_generate, say)
    if only_generate:
        return None
    from synthflux.pipeline import run_pipeline  # (pipeline imports every stage)

    runs: dict[Path, tuple[Point, PipelineConfig]] = {}
    for point, cfg in grid.points:
        if runs.setdefault(cfg.data_root, (point, cfg))[0] != point and shard is None:
            say(f"sweep {point.name}: the run of {runs[cfg.data_root][0].name} (a real-only "
                "CNN does not see generation settings)")  # fmt: skip
    for i, (point, cfg) in enumerate(runs.values()):
        if shard is not None and not shard.owns(i):
            continue
        if _done(cfg):
            say(f"sweep {point.name}: evaluated and current; skipped")
            continue
        _link_inputs(grid, point, cfg)
        say(f"sweep {point.name}: running ({i + 1} of {len(runs)})")
        run_pipeline(cfg, say=functools.partial(log.info, f"{point.name}: %s"))
    if not all(_done(cfg) for _, cfg in grid.points):
        say(
            "sweep: other points are not done yet; run the sweep again to write the table"
            + _earlier(grid.base.layout)
        )
        return None
    rows = [_row(grid, point, cfg) for point, cfg in grid.points]
    return publish(grid.base.layout, rows, say)


def _make_images(
    grid: Plan, shard: ShardSpec | None, only_generate: bool, say: Callable[[str], None]
) -> None:
    """Each generation setting's images, once, at the largest N (after its fit)."""
    for images_cfg in grid.images.values():
        _share_models(grid.base.layout, images_cfg.layout)
        if images_cfg.generate.init_source:  # real-guided: the real images it starts from
            _link_source(grid.base.layout, images_cfg.layout, images_cfg.generate.init_source)
        if images_cfg.finetune is not None and not _fit(
            grid, images_cfg, shard, only_generate, say
        ):
            continue
        if only_generate or shard is None:
            for line in generate.run(images_cfg, shard=shard if only_generate else None).lines():
                say(f"sweep images {images_cfg.layout.root.name}: {line}")
        elif not lineage.is_current(images_cfg, "generate"):
            raise DataError(
                f"the sweep's images in {images_cfg.layout.root} are not all generated: run "
                "`synthflux sweep CONFIG --only-generate` first (a Slurm array too, with --shard)"
            )


def _fit(
    grid: Plan, images_cfg: PipelineConfig, shard: ShardSpec | None, only_generate: bool,
    say: Callable[[str], None],
) -> bool:  # fmt: skip
    """The generator fitted once per generation setting, in its images' root (the real images
    linked in): whether it is complete, so that the images can be made."""
    from synthflux import finetune

    assert images_cfg.finetune is not None
    _link_source(grid.base.layout, images_cfg.layout, images_cfg.finetune.source)
    here = images_cfg.model_copy(update={"data_root": grid.base.data_root})
    if not images_cfg.layout.finetuned.exists() and lineage.is_current(here, "finetune"):
        # `synthflux run` fitted the same generator in the base root: its files, hard-linked
        # (a fit replaces files, never writes into them)
        shutil.copytree(grid.base.layout.finetuned, images_cfg.layout.finetuned,
                        copy_function=_link_file, ignore=shutil.ignore_patterns("*.tmp"))  # fmt: skip
    if only_generate or shard is None:
        summary = finetune.run(images_cfg, shard=shard)
        for line in summary.lines():
            say(f"sweep fit {images_cfg.layout.root.name}: {line}")
        if not summary.complete:
            say("sweep: the fit is not complete yet (other --shard tasks); run again after them")
        return summary.complete
    if not lineage.is_current(images_cfg, "finetune"):
        raise DataError(f"the sweep's generator in {images_cfg.layout.root} is not fitted: run "
                        "`synthflux sweep CONFIG --only-generate` first")  # fmt: skip
    return True


def status_lines(path: Path, data_root: str | Path | None = None) -> list[str]:
    """`synthflux status` of a config with [sweep]: each point, done or to run."""
    grid = plan(Path(path), data_root)
    done = [(point.name, _done(cfg)) for point, cfg in grid.points]
    width = max(len(name) for name, _ in done)
    table = grid.base.layout.sweep_table
    earlier, rerun = _earlier(grid.base.layout), "; run `synthflux sweep CONFIG`"
    if all(d for _, d in done):
        tail = f"; {table}" if _table_current(grid) else f"{rerun} to write the table{earlier}"
    else:
        tail = f"{rerun} for the rest and the table{earlier}"
    out = [f"sweep: {sum(d for _, d in done)} of {len(done)} points done{tail}"]
    out += [f"  {name:<{width}}  {'done' if d else 'to run'}" for name, d in done]
    if stale := unused(grid, Path(path)):
        out.append(f"sweep: {len(stale)} folders under {grid.base.layout.sweep} that no point "
                   f"uses ({freed_bytes(stale) / 1e6:.1f} MB): `synthflux sweep CONFIG --prune` "
                   "removes them")  # fmt: skip
    return out


def unused(grid: Plan, path: Path) -> list[Path]:
    """Folders under DATA/sweep/ that no point uses: neither of this grid nor of another
    config's sweep in the same data root (DATA/sweep/configs.json) as it stands now."""
    used = _roots(grid)
    for other in _swept_configs(grid.base.layout):
        if other != path.resolve() and other.is_file() and "sweep" in read_toml(other):
            used |= _roots(
                plan(other, grid.base.data_root)
            )  # (an error: one line, nothing removed)
    sweep = grid.base.layout.sweep
    found = [*sweep.glob("images-*"), *(sweep / "points").glob("*")]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink() and p not in used)


def _roots(grid: Plan) -> set[Path]:
    return {c.data_root for c in grid.images.values()} | {c.data_root for _, c in grid.points}


def _swept_configs(layout: DataLayout) -> list[Path]:
    try:
        return [Path(p) for p in json.loads(layout.sweep_configs.read_text())]
    except (OSError, ValueError):
        return []


def _register(layout: DataLayout, path: Path) -> None:
    """This config sweeps in this data root: another's --prune keeps what it uses."""
    with file_lock(layout.sweep / "configs.lock"):
        known = [str(p) for p in _swept_configs(layout)]
        if str(path.resolve()) not in known:
            write_json_atomic(layout.sweep_configs, [*known, str(path.resolve())])


def freed_bytes(folders: list[Path]) -> int:
    """What removing `folders` frees: a hard-linked file counts only when every link to it
    is among them (a point's images are links to the shared ones)."""
    files: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [links, size, seen]
    for folder in folders:
        for parent, _, names in os.walk(folder):  # (symbolic links are not followed)
            for name in names:
                st = os.lstat(os.path.join(parent, name))
                files.setdefault((st.st_dev, st.st_ino), [st.st_nlink, st.st_size, 0])[2] += 1
    return sum(size for links, size, seen in files.values() if seen >= links)


def prune(path: Path, data_root: str | Path | None = None) -> list[str]:
    """Remove what `unused` finds; the lines say what and how much."""
    grid = plan(Path(path), data_root)
    folders = unused(grid, Path(path))
    freed = freed_bytes(folders)
    for folder in folders:
        shutil.rmtree(folder)
    return [f"sweep: removed {folder}" for folder in folders] + [
        f"sweep: removed {len(folders)} unused folders, {freed / 1e6:.1f} MB freed"
    ]


def _earlier(layout: DataLayout) -> str:
    """While points are left, a table on disk is an earlier state's: said, never taken for
    this grid's."""
    table = layout.sweep_table
    return (
        f" ({table} is from before: settings or points have changed since)"
        if table.is_file()
        else ""
    )


def _table_current(grid: Plan) -> bool:
    """Whether the table on disk has this grid's rows as its points' results give them now
    (once every point is done)."""
    try:
        written = json.loads(grid.base.layout.sweep_summary.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(written == [_row(grid, point, cfg) for point, cfg in grid.points])


def _done(cfg: PipelineConfig) -> bool:
    """A point is done when its whole chain is current: its images, its preprocess,
    training, classify, evaluate and report (not evaluate's key alone)."""
    from synthflux.pipeline import STAGES

    return cfg.layout.evaluation_summary.is_file() and all(
        lineage.is_current(cfg, st.name) for st in STAGES if st.applies(cfg)
    )


def _share_models(base: DataLayout, layout: DataLayout) -> None:
    """A generated model (`model = "tiny"`) and the revision cache are the base root's."""
    base.models.mkdir(parents=True, exist_ok=True)
    _symlink(layout.models, base.models)


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    # relative: a data root moved or copied whole keeps its points' links inside it
    link.symlink_to(
        os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True
    )


def _link_source(base: DataLayout, layout: DataLayout, name: str) -> None:
    folder = base.source(name).folder
    if folder.is_dir():
        _symlink(layout.imported / name, folder)


def _link_inputs(grid: Plan, point: Point, cfg: PipelineConfig) -> None:
    """The point's data root: the shared models, the imported folders it uses (test sets;
    training ones when it learns from them or the filter scores with them), and the first N
    images of each class."""
    layout = cfg.layout
    _share_models(grid.base.layout, layout)
    reads_real = (cfg.filter is not None and cfg.filter.may_use_real) or cfg.generate.init_source
    for source in imported(grid.base.layout):
        if source.split == "test" or point.sources != "synthetic" or reads_real:
            _symlink(layout.imported / source.name, source.paths.folder)
    if cfg.generates:
        images = grid.images[_generation_key(cfg, grid.base)].layout
        if cfg.finetune is not None:  # the generator fitted in the images' root, and its inputs
            _link_source(grid.base.layout, layout, cfg.finetune.source)
            _symlink(layout.finetuned, images.finetuned)
        for job in plan_images(cfg):
            src, dest = images.image(job.file), layout.image(job.file)
            if src.is_file() and not (dest.exists() and os.path.samefile(src, dest)):
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.unlink(missing_ok=True)  # an image of an earlier generation setting
                _link_file(src, dest)


def _link_file(src: str | Path, dest: str | Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system: a copy
        shutil.copy2(src, dest)


# --- a point's row in the table ---------------------------------------------------------------


def _row(grid: Plan, point: Point, cfg: PipelineConfig) -> dict[str, Any]:
    summary = json.loads(cfg.layout.evaluation_summary.read_text())
    splits = summary["splits"]
    real = sum(count_records(s.paths.manifest) for s in imported(grid.base.layout)
               if s.split == "train") if point.sources != "synthetic" else 0  # fmt: skip
    row: dict[str, Any] = {"point": point.name, "sources": point.sources,
                           "synthetic_per_class": point.images,
                           "real_per_class": round(real / len(cfg.classes), 1)}  # fmt: skip
    if cfg.filters and point.images:  # what the CNN learned from: the images the filter kept
        kept = count_records(cfg.layout.filtered_manifest)
        row["kept_per_class"] = round(kept / len(cfg.classes), 1)
    row.update({k: json.dumps(v) for k, v in point.settings})
    row["train_images"] = sum(s["images"] for s in splits.values() if s["kind"] != "test")
    row["val_accuracy"] = splits.get("validation", {}).get("accuracy")
    for name, s in splits.items():
        if s["kind"] == "test":
            row[f"test:{name}"] = s["accuracy"]
    return row
