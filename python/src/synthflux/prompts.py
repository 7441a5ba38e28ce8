"""Prompt templates: `{name}` placeholders filled from a class's variables (every
combination) or from the config's pools (one draw per image, records.py), and prompt files."""

from __future__ import annotations

import string
from pathlib import Path


def placeholders(template: str) -> list[str]:
    """The `{name}`s a prompt uses."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with the given placeholders filled and the others left as `{name}`."""
    return template.format_map(_Keep(values))


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts
