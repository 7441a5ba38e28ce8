"""Prompt templates: `{name}` placeholders filled from a class's variables (every
combination) or from the config's pools (one draw per image, records.py), and prompt files."""

from __future__ import annotations

import string
from pathlib import Path


def placeholders(template: str) -> list[str]:
    """The `{name}`s a prompt uses."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def checked(template: str) -> str:
    """A pydantic validator: `template` if its braces are well formed, else a ValueError
    saying what is wrong (pydantic names the field: classes.1.prompts.0)."""
    try:
        placeholders(template)
    except ValueError as e:
        raise ValueError(f"{e} (a literal brace is written {{{{ or }}}})") from None
    return template


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
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                prompts.append(checked(line.strip()))
            except ValueError as e:
                raise ValueError(f"prompts file {path} line {n} ({line.strip()!r}): {e}") from None
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts
