"""Reading a configuration file's YAML, for `agent.config`: `TreeBuilder` turns the node tree that
`yaml.compose` gives into plain Python data — duplicate keys, unsupported tags, self-referring aliases
and merge keys (`<<`) dealt with, `${NAME}` substituted — and remembers the line and column of every
key and value, so that each problem found later can be located. A number keeps its spelling as
written (`RawInt`, `RawFloat`: "0012" where text is expected stays "0012"). Also here: which keys hold
secrets (their values are never echoed) and which only a connection needs (`status` does without).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from agent.envsubst import SubstitutionError, substitute

#: A key's place in the file: mapping keys and list indexes from the top (`("devices", "cod", "interval")`).
KeyPath = tuple[str | int, ...]

# Keys whose values are never echoed in a message, even when they were written literally.
SECRET_KEYS = frozenset({"password", "pw"})


# Keys that name a file holding a secret: what is written there may be the secret itself, typed where
# the file's path belongs (`password_file: Hunter2`), so a message shows it only when it is plausibly a
# path (`agent.configfields._may_show_path` decides).
SECRET_FILE_KEYS = frozenset({"password_file", "key"})


def is_secret_key_path(path: KeyPath) -> bool:
    return any(str(p) in SECRET_KEYS for p in path)


def is_credential_path(path: KeyPath) -> bool:
    """A user name, password, password file or TLS file: what only a connection needs."""
    return is_secret_key_path(path) or (bool(path) and path[-1] in ("username", "password_file")) or \
        (len(path) == 3 and path[:2] == ("mqtt", "tls"))


def status_reads(path: KeyPath) -> bool:
    """Whether `edge-agent status` needs the value at `path`: the buffer's place, the station id and
    the devices (intervals, channels); not the broker, uplinks, buses, alarms or the console."""
    return path[:1] in (("storage",), ("devices",)) or path == ("station", "id")


# What `status` puts where an unset ${VAR} stands in a value it never reads, when the value's own
# checks would refuse the text `${VAR}` itself (any other text value keeps its `${VAR}`).
STATUS_STAND_INS: dict[str, str] = {"url": "mqtt://unset.invalid", "urls": "mqtt://unset.invalid",
                                     "host": "unset.invalid", "port": "/unset.invalid"}  # port: a serial bus's

# Scalars as written: a number written where text is expected keeps its spelling ("0012" stays
# "0012", not 10), because `agent.config` takes the raw YAML text of the number.


class RawInt(int):
    _yaml_raw: str


class RawFloat(float):
    _yaml_raw: str


# YAML 1.1 (PyYAML) reads an integer with a leading 0 as octal: `address: 0100` copied from a manual
# would be register 64. It is decimal here, as in YAML 1.2 and as "0100" in quotes or 089 already were.
_YAML11_OCTAL = re.compile(r"[-+]?0[0-7_]+\Z")


def with_raw(value: Any, raw: str) -> Any:
    """`value` (as PyYAML constructed it from the text `raw`) remembering `raw`; an integer written
    with leading zeros is decimal."""
    if type(value) is int and _YAML11_OCTAL.match(raw):
        value = int(raw.replace("_", ""), 10)
    if type(value) is int:
        wrapped: Any = RawInt(value)
    elif type(value) is float:
        wrapped = RawFloat(value)
    else:
        return value
    wrapped._yaml_raw = raw
    return wrapped


# --------------------------------------------------------------------------------------------------
# YAML -> data, with marks

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_MAX_NODES = 200_000
TOO_DEEP = "the file is nested too deeply (lists or mappings inside each other hundreds of times)"
YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


class TooComplex(Exception):
    pass


def _not_text(text: str) -> str | None:
    """The first character of `text` that UTF-8 cannot carry, or None: a lone surrogate, written as a
    `"\\ud800"` escape in YAML or left by an environment variable whose bytes are not UTF-8. Stored in
    a reading's unit it made every write of the buffer fail."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


class TreeBuilder:
    """Builds plain data from a composed YAML node tree, remembering where each key and value is."""

    def __init__(self, file: str, env: Mapping[str, str], for_status: bool = False):
        self.file = file
        self.env = env
        self.for_status = for_status  # an unset ${VAR} is no problem where `status` does not look
        self.problems: list[tuple[KeyPath, yaml.Mark, str]] = []
        self.warnings: list[tuple[KeyPath, yaml.Mark, str]] = []  # variables set but empty
        # for_status: unset ${VAR}s given a stand-in; their problem counts only if the stand-in fails
        self.deferred: dict[KeyPath, tuple[yaml.Mark, str]] = {}
        self.marks: dict[KeyPath, tuple[yaml.Mark | None, yaml.Mark]] = {}
        self.substituted: dict[KeyPath, dict[str, str]] = {}
        self.secret_texts: set[str] = set()  # the text of values under secret keys (password, pw)
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()
        self._active: set[int] = set()
        self._count = 0

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise TooComplex
        if id(node) in self._active:
            self.problems.append((path, node.start_mark, "a YAML alias refers to itself"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.ScalarNode):
                value = self._scalar(node, path)
                if isinstance(value, str) and (bad := _not_text(value)) is not None:
                    shown = "" if is_secret_key_path(path) else f" ({bad!r})"
                    self.problems.append((path, node.start_mark, f"contains a lone surrogate{shown}, which is no "
                                          "character and cannot be stored or sent: write the character itself"))
                return value
            if isinstance(node, yaml.SequenceNode):
                if node.tag != "tag:yaml.org,2002:seq":
                    self._unsupported_tag(node, path)
                items = []
                for i, child in enumerate(node.value):
                    self.marks[path + (i,)] = (None, child.start_mark)
                    items.append(self.build(child, path + (i,)))
                return items
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return None
        finally:
            self._active.discard(id(node))

    def _unsupported_tag(self, node: yaml.Node, path: KeyPath) -> None:
        # `password: !xyz` is a tag to YAML: the "tag" may be the password (typed as `password_file` too)
        secret = is_secret_key_path(path) or (bool(path) and path[-1] in SECRET_FILE_KEYS)
        tag = "" if secret else f" {node.tag.replace('tag:yaml.org,2002:', '!!')!r}"
        self.problems.append((path, node.start_mark, f"unsupported YAML tag{tag} (put a value that starts with "
                              "'!' in quotes)"))

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        if is_secret_key_path(path):
            self.secret_texts.add(node.value)
        if node.tag == _STR_TAG:
            text = node.value
            if "${" not in text:
                return text
            try:
                result = substitute(text, self.env)
            except SubstitutionError as exc:
                if self.for_status and is_credential_path(path):
                    # `status` needs no credentials: a stand-in that passes their checks
                    return "******" if path[-1] == "pw" else text
                if self.for_status and not status_reads(path):
                    self.deferred[path] = (node.start_mark, str(exc))
                    key = path[-2] if isinstance(path[-1], int) else path[-1]
                    return STATUS_STAND_INS.get(str(key), text)
                self.problems.append((path, node.start_mark, str(exc)))
                return text
            if result.used:
                self.substituted[path] = result.used
            if empty := [name for name, value in result.used.items() if not value]:
                said = f"environment variable {empty[0]} is" if len(empty) == 1 else \
                    f"environment variables {', '.join(empty)} are"
                self.warnings.append((path, node.start_mark, f"{said} set but empty"))
            if is_secret_key_path(path):
                self.secret_texts.discard(node.value)  # `${NAME}` itself is no secret
                self.secret_texts.add(result.text)
            if node.style is None:  # plain scalar: `port: ${PORT}` is a number, as if written there
                tag = self._resolver.resolve(yaml.ScalarNode, result.text, (True, False))
                if tag in _NUMBER_TAGS:
                    value = self._constructor.construct_object(yaml.ScalarNode(tag, result.text))
                    return with_raw(value, result.text)
            return result.text
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        if node.tag not in self._constructor.yaml_constructors:
            self._unsupported_tag(node, path)
            return None
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, LookupError, TypeError):  # `!!int abc` (the error quotes the value)
            self.problems.append((path, node.start_mark, f"the value does not fit its YAML tag {tag} "
                                  "(remove the tag, or quote the value for text)"))
            return None
        return with_raw(value, node.value)

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        if node.tag not in ("tag:yaml.org,2002:map",):
            self._unsupported_tag(node, path)
        result: dict[str, Any] = {}
        first: dict[str, yaml.Mark] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append((path, key_node.start_mark, "a key must be a plain name, not a list or "
                                      "mapping"))
                continue
            key = key_node.value
            if key in first:
                self.problems.append((path + (key,), key_node.start_mark,
                                      f"duplicate key '{key}' (first defined at line {first[key].line + 1})"))
                continue
            first[key] = key_node.start_mark
            self.marks[path + (key,)] = (key_node.start_mark, value_node.start_mark)
            result[key] = self.build(value_node, path + (key,))
        for key_node, value_node in self._merged_pairs(merges, path):
            key = key_node.value
            if key not in result:
                self.marks[path + (key,)] = (key_node.start_mark, value_node.start_mark)
                result[key] = self.build(value_node, path + (key,))
        return result

    def _merged_pairs(self, sources: list[yaml.Node], path: KeyPath, depth: int = 0) -> list[tuple[Any, Any]]:
        """`<<: *anchor` pairs, earlier sources first (so that they win, as YAML says)."""
        pairs: list[tuple[Any, Any]] = []
        if depth > 20:
            return pairs
        flat: list[yaml.Node] = []
        for src in sources:
            if isinstance(src, yaml.SequenceNode):
                flat.extend(src.value)
            else:
                flat.append(src)
        for src in flat:
            if not isinstance(src, yaml.MappingNode):
                self.problems.append((path, src.start_mark, "'<<' must merge a mapping (or a list of them)"))
                continue
            nested = [v for k, v in src.value if k.tag == _MERGE_TAG]
            pairs.extend((k, v) for k, v in src.value if k.tag != _MERGE_TAG and isinstance(k, yaml.ScalarNode))
            pairs.extend(self._merged_pairs(nested, path, depth + 1))
        return pairs
