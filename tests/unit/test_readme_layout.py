"""The README's Layout block names every module of `agent/` and `drivers/`: a newcomer looking for where
something lives reads it first (four modules had been added without it: bufferschema, certwatch,
startsink, serial_port)."""

from __future__ import annotations

import re

from harness import REPO


def names_by_directory() -> dict[str, set[str]]:
    """Directory (`agent`, `drivers`, ...) -> the words its lines of the Layout block hold (a directory's
    list goes on over the indented lines below it)."""
    match = re.search(r"^## Layout\n+```\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    assert match, "README.md has a Layout section with a code block"
    names: dict[str, set[str]] = {}
    directory = ""
    for line in match.group(1).splitlines():
        if line[:1].strip():
            directory = line.split()[0].rstrip("/")
        names.setdefault(directory, set()).update(re.findall(r"[a-z_0-9]+", line))
    return names


def test_the_layout_names_every_module():
    names = names_by_directory()
    missing = [f"{package}/{module.name}" for package in ("agent", "drivers")
               for module in sorted((REPO / package).glob("*.py"))
               if module.stem != "__init__" and module.stem not in names.get(package, set())]
    assert not missing, f"README Layout does not name {missing}"
