"""The README's Layout block names every module of `agent/` and `drivers/`: a newcomer looking for where
something lives reads it first (four modules had been added without it: bufferschema, certwatch,
startsink, serial_port). Its Commands table names every command's options."""

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


def test_the_commands_table_names_every_option_of_every_command():
    """Each row of the README's Commands table shows its command's options as `--help` has them: the
    table showed `simulate -c FILE` while simulate takes `--log-level` as run does."""
    import argparse

    from agent.cli import build_parser

    text = (REPO / "README.md").read_text()
    table = text[text.index("## Commands"):text.index("## How it works")]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `edge-agent ([a-z-]+)[^|]*\|", table, re.M)}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {option}" for name, parser in sub.choices.items() for action in parser._actions
               for option in action.option_strings[-1:]
               if option not in ("--help", "--config") and option not in rows.get(name, "")]
    assert set(rows) == set(sub.choices), sorted(rows)
    assert missing == [], missing
