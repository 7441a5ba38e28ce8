"""The exceptions a user can meet; the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import difflib
from typing import get_args

from pydantic import BaseModel, ValidationError


class SynthfluxError(Exception):
    """Base class: anything the user can fix (bad config, missing model, bad input)."""


class ConfigError(SynthfluxError):
    """The pipeline config is missing or invalid."""


class ModelError(SynthfluxError):
    """The diffusion model cannot be found or loaded."""


class DataError(SynthfluxError):
    """Files on the data volume are missing, malformed or inconsistent."""


class CnnError(SynthfluxError):
    """The CNN's runtime (container, local julia, PyTorch twin) cannot run, failed, or wrote
    bad output; a classify job raises ClassifyError, a training job TrainError."""


class ClassifyError(CnnError):
    """The classifier failed or wrote bad output."""


class TrainError(CnnError):
    """The trainer failed or wrote bad output."""


class CnnFailed(CnnError):
    """The CNN's process exited non-zero or timed out; carries its exit code and last log
    lines. Raised as ClassifierFailed or TrainerFailed."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None,
        log_tail: list[str],
        timed_out: bool = False,
        prefix: str = "julia",
    ) -> None:
        shown = "".join(f"\n  {prefix} | {line}" for line in log_tail)
        more = f"; last {len(log_tail)} log lines:{shown}" if log_tail else "; it printed nothing"
        super().__init__(message + more)
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.timed_out = timed_out


class ClassifierFailed(CnnFailed, ClassifyError):
    """The classifier exited non-zero or timed out."""


class TrainerFailed(CnnFailed, TrainError):
    """The trainer exited non-zero or timed out."""


class SubmitError(SynthfluxError):
    """Slurm is missing or refused a submission, or the submit options are invalid."""


class Rejected(Exception):
    """An input image preprocess cannot use; its message is the one-line reason.

    Not a SynthfluxError: a rejected image is quarantined (rejects.jsonl), not a failed run.
    """


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """A pydantic error as one line: where, the value, what is wrong (the first of them)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = _unknown_key(first["loc"], model)
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}{shown}: {msg}{more}"


def _unknown_key(loc: tuple[int | str, ...], model: type[BaseModel]) -> str:
    """'not a known setting', with the closest allowed names (a typo is the usual cause)."""
    for part in loc[:-1]:
        if isinstance(part, str):  # a section, or a list of them (classes)
            field = model.model_fields[part].annotation
            inner = get_args(field)[0] if get_args(field) else field
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                model = inner
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"not a known setting; {hint}allowed here: {', '.join(allowed)}"
