"""Paths in a config: one rule, relative to the config file's folder (as TOML users expect),
so a config means the same files from any working directory. `--data` on the command line
is relative to the working directory, as command-line paths are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

# Files that are weights, never a Hub repository's name.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")


def looks_like_hub_id(name: str) -> bool:
    """ "owner/name" (or a bare legacy "name"): not a path that starts with '.', '/' or '~',
    nor a weights file."""
    return (
        not name.startswith((".", "/", "~"))
        and name.count("/") <= 1
        and not name.lower().endswith(WEIGHT_SUFFIXES)
    )


def identity(value: str) -> str:
    """What names a model or an adapter in records and keys: a Hub id (or "tiny") as given,
    a local file or folder by its name alone (its bytes are hashed beside the name), so that
    one config makes the same records from any working directory."""
    return value if looks_like_hub_id(value) else Path(value).name


def _config_dir(info: ValidationInfo) -> Path | None:
    folder = (info.context or {}).get("config_dir")
    return None if folder is None else Path(folder)


def anchor(value: str, folder: Path | None) -> str:
    """`value` joined to `folder`, lexically normalised; a relative result keeps a leading
    "./" so that it is never read as a Hub id later."""
    if not value or folder is None:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    joined = os.path.normpath(folder / path)
    return joined if joined.startswith(("/", "..")) else f".{os.sep}{joined}"


def _local(value: str, info: ValidationInfo) -> str:
    return anchor(value, _config_dir(info))


def _local_or_hub(value: str, info: ValidationInfo) -> str:
    folder = _config_dir(info)
    if value == "tiny" or folder is None:
        return value
    if looks_like_hub_id(value) and not (folder / value).exists():
        return value  # a Hub id: nothing of that name beside the config
    return anchor(value, folder)


def _data_root(value: Path, info: ValidationInfo) -> Path:
    if not (info.context or {}).get("anchor_data_root", True):
        return value  # given on the command line: relative to the working directory
    return Path(anchor(str(value), _config_dir(info)))


# A file or folder: relative to the config file's folder.
LocalPath = Annotated[str, AfterValidator(_local)]
# A local file or folder (as LocalPath), a Hugging Face Hub id, or "tiny".
LocalOrHub = Annotated[str, AfterValidator(_local_or_hub)]
DataRoot = AfterValidator(_data_root)
