"""Names of local devices, as `[generate] devices` and `--devices` give them: "cpu" (may
repeat: workers that share the cores), "cuda" (= "cuda:0") or "cuda:N" (each at most once)."""

from __future__ import annotations

import re

DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def device_list(names: list[str]) -> list[str]:
    """The names checked and spelled one way; a ValueError says which is wrong."""
    if not names:
        raise ValueError('is empty: give devices, or "all" (every visible GPU)')
    out: list[str] = []
    for name in names:
        if not DEVICE.fullmatch(name):
            raise ValueError(f'{name!r} is not a device: use "cpu", "cuda" or "cuda:N"')
        if name.startswith("cuda"):  # one spelling per GPU: "cuda", "cuda:00" are cuda:0
            name = f"cuda:{int(name.partition(':')[2] or 0)}"
        if name != "cpu" and name in out:
            raise ValueError(f"{name!r} is listed twice: one worker per GPU")
        out.append(name)
    return out


def parse_devices(text: str) -> str | list[str]:
    """--devices: "all", or names separated by commas ("cuda:0,cuda:2")."""
    return "all" if text == "all" else device_list([n.strip() for n in text.split(",")])
