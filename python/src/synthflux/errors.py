"""The exceptions a user can meet; the CLI prints them as one line, without a traceback."""


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
