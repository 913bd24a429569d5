"""Where a problem of a configuration file is, and how it is worded: `_walk_loc` maps a pydantic error's
location to the key path in the file (through the models of `Config`); `_message` words each kind of
pydantic error for a technician (with "did you mean" hints and units); `_Locator` turns a path into a
`Problem` at the line and column the YAML tree builder remembered, and never lets a secret through
(the value of a password, or a variable substituted into one, is masked wherever it appears); and
`_yaml_problem` words a YAML syntax error.

Imports `agent.configproblem`, `agent.configfields`, `agent.configdevices` (the keys of each type of
bus), `agent.configroot` (`Config`) and `agent.configyaml`; nothing else from the project.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

import yaml
from pydantic import BaseModel, Field

from agent.configdevices import _BUS_KEYS, _BUS_MODELS
from agent.configfields import _Broken, _show, _suggest, _unwrap
from agent.configproblem import FILE_PATH, Problem, _dotted
from agent.configroot import Config
from agent.configyaml import KeyPath, TreeBuilder, is_secret_key_path

# Unit words appended to range messages ("must be at least 0.1 seconds").
_UNITS: dict[str, str] = {
    name: " seconds"
    for name in (
        "interval", "timeout", "reconnect_max", "shutdown_grace", "keepalive", "delay", "clear_delay",
        "window", "stale", "fault", "min_on", "period", "stuck_after",
    )
} | {"max_mb": " MB", "keep_sent_days": " days", "commit_interval_ms": " ms"}


# --------------------------------------------------------------------------------------------------
# pydantic errors -> problems


def _field_types(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        out: dict[str, Any] = {}
        for name, info in tp.model_fields.items():
            ann: Any = info.annotation
            if info.discriminator is not None:
                ann = Annotated[ann, Field(discriminator=info.discriminator)]
            out[name] = ann
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {f.name: None for f in dataclasses.fields(tp)}
    return None


class _Walk(NamedTuple):
    path: KeyPath
    is_key: bool  # the error is about a mapping key, not its value
    allowed: list[str] | None  # field names where the last element sits (for "did you mean")
    here: list[str] | None  # field names of the object the path leads to


def _walk_loc(loc: tuple[str | int, ...]) -> _Walk:
    """Map a pydantic `loc` to a data path: drop union tags, note `[key]`, and tell which field
    names are allowed around it."""
    tp: Any = Config
    path: list[str | int] = []
    is_key = False
    allowed: list[str] | None = None
    for elem in loc:
        if elem == "[key]":
            is_key = True
            continue
        kind, tp2 = _unwrap(tp) if tp is not None else ("type", None)
        if kind == "disc":
            tp = None
            for member in tp2 or ():
                literal = member.model_fields["type"].annotation
                if elem in typing.get_args(literal):
                    tp = member
            continue
        fields = _field_types(tp2)
        allowed = list(fields) if fields is not None else None
        path.append(elem)
        origin = typing.get_origin(tp2)
        if fields is not None:
            tp = fields.get(str(elem))
        elif origin is dict:
            tp = typing.get_args(tp2)[1]
        elif origin is list:
            tp = typing.get_args(tp2)[0]
        else:
            tp = None
    here = None
    if tp is not None:
        kind, final = _unwrap(tp)
        fields = _field_types(final) if kind == "type" else None
        here = list(fields) if fields is not None else None
    return _Walk(tuple(path), is_key, allowed, here)


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _message(err: Mapping[str, Any], path: KeyPath, allowed: list[str] | None, secret: bool) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    key = str(path[-1]) if path else ""
    got = "" if secret else f" (got {_show(value)})"
    unit = _UNITS.get(key, "")
    if etype in ("missing", "missing_argument"):
        return f"missing required key '{key}'"
    if etype in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = f"unknown key '{key}'"
        elsewhere = _BUS_KEYS.get(key, ())
        if path[:1] == ("buses",) and elsewhere and allowed and key not in allowed:
            # `parity` on a tcp bus is no typo of `port`: it belongs to another type of bus
            this = next((f"a {kind} bus" for kind, m in _BUS_MODELS.items() if set(m.model_fields) == set(allowed)),
                        "this type of bus")
            return msg + f": a key of {' and '.join(elsewhere)} buses, not of {this}"
        if allowed:
            hint = _suggest(key, allowed)
            msg += hint if hint else f"; allowed here: {', '.join(allowed)}"
        return msg
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number" + got
    if etype in ("float_type", "float_parsing"):
        return "expected a number" + got
    if etype == "finite_number":
        return "must be a finite number, not .inf or .nan" + got
    if etype in ("bool_type", "bool_parsing"):
        return "expected true or false" + got
    if etype in ("string_type", "path_type"):
        return "expected text" + got
    if etype in ("dict_type", "model_type", "model_attributes_type", "dataclass_type",
                 "dataclass_exact_type", "mapping_type"):
        return "expected a mapping (key: value lines)" + got
    if etype in ("list_type", "tuple_type"):
        return "expected a list" + got
    if etype == "literal_error":
        return f"must be {ctx.get('expected', '')}" + got
    if etype == "greater_than":
        return f"must be greater than {_num(ctx.get('gt'))}{unit}" + got
    if etype == "greater_than_equal":
        return f"must be at least {_num(ctx.get('ge'))}{unit}" + got
    if etype == "less_than":
        return f"must be less than {_num(ctx.get('lt'))}{unit}" + got
    if etype == "less_than_equal":
        return f"must be at most {_num(ctx.get('le'))}{unit}" + got
    if etype == "too_short":
        return "must not be empty"
    if etype == "union_tag_invalid":
        return f"unknown type {ctx.get('tag')!r}; use {ctx.get('expected_tags')}"
    if etype == "union_tag_not_found":
        return "missing required key 'type'"
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _replace_secret(message: str, secret: str, mask: str) -> str:
    """`message` with `secret` masked. A short one only where it stands alone: replaced inside words
    ("p" in "password"), it would both garble the message and show what the secret is."""
    if len(secret) >= 4:
        return message.replace(secret, mask)
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", lambda _: mask, message)


class _Locator:
    """Turns paths into Problems using the marks the tree builder remembered."""

    def __init__(self, file: str, builder: TreeBuilder, root_mark: yaml.Mark):
        self.file = file
        self.builder = builder
        self.root_mark = root_mark
        # Environment variables substituted into a secret key's value: secrets wherever they are used.
        self.secret_vars = {name: value for path, used in builder.substituted.items()
                            if is_secret_key_path(path) for name, value in used.items()}

    def mark(self, path: KeyPath, where: str) -> yaml.Mark:
        marks = self.builder.marks
        if where in ("key", "value") and path in marks:
            key_mark, value_mark = marks[path]
            return (key_mark or value_mark) if where == "key" else value_mark
        probe = path[:-1] if where == "missing" else path
        while probe:
            if probe in marks:
                key_mark, value_mark = marks[probe]
                return key_mark or value_mark
            probe = probe[:-1]
        return self.root_mark

    def is_secret(self, path: KeyPath) -> bool:
        """Messages about `path` do not show its value: a secret key's, or one holding a secret variable."""
        if is_secret_key_path(path):
            return True
        return any(path[: len(p)] == p and not self.secret_vars.keys().isdisjoint(used)
                   for p, used in self.builder.substituted.items())

    def problem(self, path: KeyPath, where: str, message: str, *, warning: bool = False) -> Problem:
        m = self.mark(path, where)
        return Problem(self.file, m.line + 1, m.column + 1, _dotted(path), self._redact(path, message), warning)

    def at_mark(self, path: KeyPath, mark: yaml.Mark, message: str) -> Problem:
        return Problem(self.file, mark.line + 1, mark.column + 1, _dotted(path), self._redact(path, message))

    def _redact(self, path: KeyPath, message: str) -> str:
        """Never let a secret through: the value of a secret key (password, pw) becomes `***`, and a
        variable substituted into one `${NAME}`, wherever they appear. Short ones (that could be part
        of any word) only in messages about a secret value itself."""
        here = self.is_secret(path)
        for name, value in self.secret_vars.items():
            if value and (len(value) >= 4 or here):
                message = _replace_secret(message, value, "${" + name + "}")
        for text in sorted(self.builder.secret_texts, key=len, reverse=True):
            if text and (len(text) >= 4 or here):
                message = _replace_secret(message, text, "***")
        return message

    def from_pydantic(self, err: Mapping[str, Any]) -> Problem:
        loc = tuple(err["loc"])
        path, is_key, allowed, here = _walk_loc(loc)
        etype = err["type"]
        ctx = err.get("ctx") or {}
        where = "value"
        if etype == "value_error" and here:
            # A dataclass's own check ("address: 70000 is outside ..."): point at the key it names.
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            m = re.match(r"([A-Za-z_]\w*)((?:\.\w+)*): (.*)", msg, re.S)
            if m and m.group(1) in here:
                sub = (m.group(1),) + tuple(p for p in m.group(2).split(".") if p)
                full = path + sub
                return self.problem(full, "value", m.group(3))
        if etype in ("missing", "missing_argument"):
            where = "missing"
        elif etype in ("extra_forbidden", "unexpected_keyword_argument") or is_key:
            where = "key"
        elif etype == "union_tag_invalid":
            path += ("type",)
        elif etype == "union_tag_not_found":
            path += ("type",)
            where = "missing"
        elif etype in ("config", "config_section"):
            message = _message(err, path, allowed, self.is_secret(path))
            return self.broken(path, _Broken(message, ctx.get("at"), etype == "config_section"))
        message = _message(err, path, allowed, self.is_secret(path))
        return self.problem(path, where, message)

    def broken(self, path: KeyPath, broken: _Broken) -> Problem:
        """A rule of the section at `path` (a model validator's error, or `_section_rules`)."""
        where = "value"
        if broken.at:
            path += tuple(int(p) if p.isdigit() else p for p in broken.at.split("."))
            where = "key" if path in self.builder.marks else "missing"
        elif broken.message.startswith("missing required key '"):
            # "missing required key 'x'" raised by a model validator: show the missing key's path.
            return self.problem(path + (broken.message.split("'")[1],), "missing", broken.message)
        elif broken.section:
            where = "key"  # a rule about the whole section: point at its key
        return self.problem(path, where, broken.message)


def _yaml_problem(file: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}"
    if exc.problem and exc.problem.startswith("found undefined alias"):  # `password: *xyz`: the name may be a secret
        message = "YAML syntax error: found undefined alias (put a value that starts with '*' in quotes)"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    if mark is not None and mark.buffer is not None and mark.buffer[mark.pointer - 1:mark.pointer + 1] == "${":
        # in a flow collection a plain `${NAME}` ends at its `{`, which YAML takes for a new mapping
        message += "; inside {...} or [...], put a ${NAME} in quotes: \"${NAME}\""
    elif exc.problem and "'\\t'" in exc.problem:
        message += _tab_hint(mark)
    elif exc.problem and exc.problem.startswith(_INDENTATION_PROBLEMS):
        message += ("; check the indentation of this line: the keys of one section start in the same column "
                    "(a value that contains ': ' goes in quotes)")
    return Problem(file, line, col, FILE_PATH, message)


def _tab_hint(mark: yaml.Mark | None) -> str:
    """Why a tab at `mark` is refused: indentation, or (PyYAML refuses it there too) after a key."""
    line = "" if mark is None or mark.buffer is None else \
        mark.buffer[: mark.pointer].rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    if line.rstrip(" \t").endswith(":"):
        return "; a tab cannot separate a key from its value here: use a space"
    if line.strip(" \t"):
        return "; tabs are not allowed here: use spaces"
    return "; YAML does not allow tabs for indentation, use spaces"


#: PyYAML's words for what is, in a hand-written config, nearly always a key indented wrongly.
_INDENTATION_PROBLEMS = ("mapping values are not allowed here", "did not find expected key",
                         "expected <block end>")
