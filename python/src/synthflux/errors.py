"""The exceptions a user can meet; the CLI prints them as one line, without a traceback."""


class SynthfluxError(Exception):
    """Base class: anything the user can fix (bad config, missing model, bad input)."""


class ConfigError(SynthfluxError):
    """The pipeline config is missing or invalid."""


class ModelError(SynthfluxError):
    """The diffusion model cannot be found or loaded."""


class DataError(SynthfluxError):
    """Files on the data volume are missing, malformed or inconsistent."""


class ClassifyError(SynthfluxError):
    """The classifier (container or local julia) failed or wrote bad output."""
