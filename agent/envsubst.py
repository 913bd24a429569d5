"""`${NAME}` substitution of environment variables in configuration strings (SPEC §2).

Pure functions, no I/O; imports nothing from the project. `$${` stands for a literal `${`. Error
messages name the variable, never its value (it may be a password).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SubstitutionError(ValueError):
    """A string could not be substituted: unset variable(s) or a malformed `${...}`."""


@dataclass
class Substitution:
    """The result of `substitute`: the new text and the variables that went into it."""

    text: str
    used: dict[str, str] = field(default_factory=dict)  # NAME -> value (keep it out of messages!)

    @property
    def changed(self) -> bool:
        return bool(self.used)


def substitute(text: str, env: Mapping[str, str]) -> Substitution:
    """Replace every `${NAME}` in `text` by `env[NAME]`; `$${` gives a literal `${`.

    Raises SubstitutionError naming every unset variable, or describing a malformed reference
    (without quoting the text, which may be a literal password).
    """
    out: list[str] = []
    used: dict[str, str] = {}
    missing: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith("$${", i):
            out.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            end = text.find("}", i + 2)
            if end < 0:
                raise SubstitutionError("'${' without a closing '}' (write '$${' for a literal '${')")
            name = text[i + 2 : end]
            if not _NAME.match(name):
                raise SubstitutionError(
                    "'${...}' must hold an environment variable name (letters, digits, '_'; "
                    "write '$${' for a literal '${')"
                )
            if name in env:
                used[name] = env[name]
                out.append(env[name])
            elif name not in missing:
                missing.append(name)
            i = end + 1
            continue
        out.append(text[i])
        i += 1
    if missing:
        if len(missing) == 1:
            raise SubstitutionError(f"environment variable {missing[0]} is not set")
        raise SubstitutionError("environment variables not set: " + ", ".join(missing))
    return Substitution("".join(out), used)
