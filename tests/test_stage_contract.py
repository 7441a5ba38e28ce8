"""The stage contract: a new stage is one module and one entry in `pipeline.STAGES`; the CLI,
`run`, `status` and `submit` derive everything from it; lineage answers "is it current?" for
every stage; and the CNN's own [cnn] section with its automatic backend."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli
from synthflux import backends, cli, lineage, pipeline
from synthflux.config import PipelineConfig
from synthflux.contracts import read_dataset
from synthflux.errors import TrainError
from synthflux.sources import all_sources
from synthflux.stages import Option, Stage, at_least

# --- a throw-away stage, declared here and nowhere else -----------------------------------------


@dataclass
class CountSummary:
    counts: dict[str, int]
    top: int = 1
    complete: bool = True

    def lines(self) -> list[str]:
        return [f"counted {sum(self.counts.values())} images (top {self.top})"]


def _counts_file(cfg: PipelineConfig) -> Path:
    return cfg.layout.root / "count" / "counts.json"


def _count_key(cfg: PipelineConfig) -> str:
    return str((lineage.marker(cfg, "preprocess") or {}).get("key"))


def _count(cfg: PipelineConfig, *, top: int = 1) -> CountSummary:
    lineage.require(cfg, "preprocess")
    counts = {
        s.name: int(read_dataset(cfg.layout.prepared(s.name))["images"]) for s in all_sources(cfg)
    }
    _counts_file(cfg).parent.mkdir(parents=True, exist_ok=True)
    _counts_file(cfg).write_text(json.dumps(counts))
    lineage.record(cfg, "count", key=_count_key(cfg), seconds=0.0, outputs=[_counts_file(cfg)])
    return CountSummary(counts, top=top)


COUNT = Stage(
    "count", _count, key=_count_key, folder=lambda layout: layout.root / "count",
    results=lambda cfg: [_counts_file(cfg)], needs=("preprocess",),
    options=(Option(("--top",), {"type": at_least(1), "default": 1, "help": "how many"}),),
    help="count every source's preprocessed images", description="A scratch stage.",
)  # fmt: skip


@pytest.fixture
def with_count_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """COUNT registered after preprocess: the one entry a new stage adds."""
    stages = list(pipeline.STAGES)
    at = [s.name for s in stages].index("preprocess") + 1
    monkeypatch.setattr(pipeline, "STAGES", (*stages[:at], COUNT, *stages[at:]))


def test_a_new_stage_is_one_declaration(with_count_stage, write_config, capsys, tmp_path):
    path, cfg = write_config(cnn={"backend": "reference"})
    # --help lists it, its own --help has its options, `run --help` names it in order
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "count " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["count", "--help"])
    assert "--top" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.index("preprocess --") < text.index("count -- count every") < text.index("train --")
    # status before: waiting for the stages before it
    assert cli.main(["status", str(path)]) == 0
    assert "count       incomplete waiting for the stage before it" in capsys.readouterr().out
    # run runs it in its place, with the CLI's option passed through
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    images = len(cfg.layout.manifest.read_text().splitlines())
    assert f"count: counted {images} images (top 1)" in out
    assert out.index("preprocess:") < out.index("count:") < out.index("train:")
    assert json.loads(_counts_file(cfg).read_text()) == {"synthetic": images}
    assert cli.main(["count", str(path), "--top", "3"]) == 0
    assert f"count: counted {images} images (top 3)" in capsys.readouterr().out
    # status and lineage: complete, and stale once its output changes
    assert cli.main(["status", str(path)]) == 0
    assert "count       complete" in capsys.readouterr().out
    _counts_file(cfg).write_text("{}")
    assert "counts.json changed since count wrote it" in str(lineage.problem(cfg, "count"))
    # submit --dry-run: one job after preprocess's array, before train's
    assert cli.main(["submit", str(path), "--shards", "2", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "#SBATCH --job-name=synthflux-count" in dry
    assert "-m synthflux count " in dry
    assert (
        dry.index("synthflux-preprocess")
        < dry.index("synthflux-count")
        < dry.index("synthflux-train")
    )


# --- the command line ---------------------------------------------------------------------------


def test_synthflux_alone_prints_the_help():
    done = run_cli()
    assert done.returncode == 0, done.stderr
    assert "usage: synthflux" in done.stdout and "generate" in done.stdout
    assert done.stderr == ""


def test_every_stage_has_a_command_and_cnn_stages_take_a_backend():
    for st in pipeline.STAGES:
        text = run_cli(st.name, "--help").stdout
        assert st.name in text
        assert ("--backend" in text) == st.runs_cnn, st.name


# --- the CNN's backend ------------------------------------------------------------------------


def test_auto_backend_falls_back_to_reference_and_says_why(write_config, caplog):
    path, cfg = write_config(cnn={"image": "synthflux-julia:no-such-tag", "julia": "no-such-julia"})
    assert cfg.cnn.backend == "auto"  # the default
    backends._detect.cache_clear()
    backends._said.clear()
    with caplog.at_level(logging.INFO, logger="synthflux"):
        chosen = backends.choose(cfg)
        again = backends.choose(cfg)
    assert chosen.cnn.backend == again.cnn.backend == "reference"
    said = [r.getMessage() for r in caplog.records if "cnn backend auto" in r.getMessage()]
    assert len(said) == 1, said  # once per process
    assert "no Docker image 'synthflux-julia:no-such-tag'" in said[0] and "no-such-julia" in said[0]
    # status runs nothing: the backend whose results it checks is a word of its header
    status = run_cli("status", str(path))
    assert "CNN results of backend reference (auto)" in status.stdout.splitlines()[0]
    assert "cnn backend auto" not in status.stderr, status.stderr


def test_run_from_checks_the_backend_before_deleting_anything(write_config):
    path, cfg = write_config(cnn={"backend": "reference"})
    assert run_cli("run", str(path)).returncode == 0
    kept = sorted(p for p in cfg.data_root.rglob("*") if p.is_file())
    broken, _ = write_config(cnn={"backend": "local", "julia": "/no/such/julia"}, name="b.toml")
    done = run_cli("run", str(broken), "--from", "train")
    assert done.returncode == 2
    assert "cnn.julia = '/no/such/julia' is not an executable" in done.stderr
    assert "removed" not in done.stdout
    assert sorted(p for p in cfg.data_root.rglob("*") if p.is_file()) == kept


def test_training_failures_are_train_errors_naming_the_cnn_settings(write_config):
    from synthflux import train

    assert run_cli("run", str(write_config(cnn={"backend": "reference"})[0])).returncode == 0
    _, cfg = write_config(cnn={"backend": "local", "julia": "/no/such/julia"}, name="b.toml")
    with pytest.raises(TrainError, match=r"cnn\.julia") as e:
        train.run(cfg)
    assert type(e.value).__name__ == "TrainError"


def test_the_docs_name_every_stage_in_order():
    """docs/architecture.md's module table and the README's `run --from` list follow STAGES."""
    from conftest import REPO

    arch = (REPO / "docs" / "architecture.md").read_text()
    modules = [arch.index(f"| `{st.name}.py` |") for st in pipeline.STAGES]
    assert modules == sorted(modules)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "[--from " + "|".join(st.name for st in pipeline.STAGES) + "]" in readme
