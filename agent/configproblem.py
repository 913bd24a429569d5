"""A problem of a configuration file and how it is shown: `Problem` (`FILE:LINE:COL: path: message`, or
`...: path: warning: message`, on one line), `ConfigError` (every problem of an invalid file, and its
warnings), `FILE_PATH` (the path of a problem with the file as a whole) and `_dotted` (a key path as
problems show it: `devices.cod.interval`, `alarms.2.above`).

Imports `agent.configyaml` (`KeyPath`) only; the other modules of the configuration layer build on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.configyaml import KeyPath

#: Path shown for problems that belong to the file as a whole (missing, unreadable, empty, syntax).
FILE_PATH = "(file)"


def _one_line(text: str) -> str:
    """`text` with line breaks, control and other unprintable characters escaped (`\\n`, `\\x1b`,
    `\\u2028`), so that a problem stays on one line whatever the file's keys and values hold."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file, located at a 1-based line and column. A warning
    (`warning=True`) does not make the file invalid: `FILE:LINE:COL: path: warning: message`."""

    file: str
    line: int
    col: int
    path: str  # dotted key path (`devices.cod.interval`, `alarms.2.above`) or FILE_PATH
    message: str
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        return _one_line(f"{self.file}:{self.line}:{self.col}: {self.path}: {kind}{self.message}")


class ConfigError(Exception):
    """The configuration is invalid; `.problems` lists every problem found, in file order, and
    `.warnings` what would do nothing even once the problems are fixed (see `Config.warnings`)."""

    def __init__(self, problems: list[Problem], warnings: Iterable[Problem] = ()):
        self.problems = list(problems)
        self.warnings = list(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))


def _dotted(path: KeyPath) -> str:
    return ".".join(str(p) for p in path) if path else FILE_PATH
