"""The JSON Schema of the configuration file (`edge-agent schema`, for editors), made from the models
of `agent.config` and widened so that it accepts every file `check-config` accepts."""

from __future__ import annotations

import sys
from typing import Any

from agent.config import CHANNEL_RE, Config


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (for editors; `edge-agent schema`). It accepts every
    file `check-config` accepts (an editor must not flag a valid file): besides what the models
    say, `${NAME}` where a number or a value of a given form is expected, a quoted number, register
    entries without `address` that override a profile's entry, and `min_count`'s other names."""
    schema = Config.model_json_schema(mode="validation")
    defs = schema["$defs"]
    defs["RegisterSpec"]["required"] = ["channel"]  # an override of a profile's entry may give only its changes
    defs["RegisterSpec"]["properties"]["channel"]["pattern"] = f"^{CHANNEL_RE.pattern}$"
    defs["Device"]["allOf"] = [{"if": {"not": {"required": ["profile"]}},
                                "then": {"properties": {"registers": {"items": {"required": ["address"]}}}}}]
    counts = defs["AggregateCount"]["properties"]
    counts.update({"10m": counts["minute"], "1h": counts["hour"], "1d": counts["day"]})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_allow_substitution(_names_checked(schema))}


def _names_checked(node: Any) -> Any:
    """`node` where a mapping whose keys follow a pattern (device ids, bus names, channel codes)
    refuses other keys: pydantic's `patternProperties` alone would let any other name through."""
    if isinstance(node, list):
        return [_names_checked(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {key: _names_checked(value) for key, value in node.items()}
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "properties" not in node:
        ((pattern, values),) = patterns.items()
        del node["patternProperties"]
        node.update(propertyNames={"pattern": pattern}, additionalProperties=values)
    return node


_SUBSTITUTION = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"}
_QUOTED_NUMBER = {"type": "string", "pattern": r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"}
# YAML 1.1 (PyYAML, so the agent) reads these as true/false; an editor speaking YAML 1.2 sees text.
_YES_NO_WORDS = {"enum": [w for word in ("yes", "no", "on", "off") for w in (word, word.title(), word.upper())]}
_ANNOTATIONS = ("title", "description", "default")  # kept on the outside when a schema gets alternatives
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else")  # not propertyNames: no ${} in keys


def _quoted_choices(choices: list[int]) -> dict[str, Any]:
    """The texts `_quoted_choice` reads as one of the whole numbers `choices`: spaces around, an
    optional sign (`-` only for 0 and negative numbers), leading zeros."""
    forms = []
    for c in choices:
        digits = "0*" + str(abs(c)) if c else "0+"
        forms.append(f"[-+]?{digits}" if c == 0 else f"\\+?{digits}" if c > 0 else f"-{digits}")
    return {"type": "string", "pattern": rf"^\s*(?:{'|'.join(forms)})\s*$"}


def _allow_substitution(node: Any) -> Any:
    """`node` (a JSON Schema) where every number, enumerated value and patterned text may also be a
    `${NAME}` to substitute (and a number a quoted number, as pydantic reads one), and true/false
    may be spelled yes/no or on/off."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            if {"type": "string"} in node[key]:  # any text is fine already (Text, which takes numbers too)
                continue
            node[key] = [_allow_substitution(n) for n in node[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            node[key] = {name: _allow_substitution(n) for name, n in node[key].items()}
    for key in _SUBSCHEMAS:
        if key in node:
            node[key] = _allow_substitution(node[key])
    if "pattern" in node:
        node["pattern"] = f"(?:{node['pattern']})|{_SUBSTITUTION['pattern']}"
    alternatives: list[dict[str, Any]]
    if "enum" in node or "const" in node:
        alternatives = [_SUBSTITUTION]
        choices = node["enum"] if "enum" in node else [node["const"]]
        if choices and all(type(c) is int for c in choices):  # `qos: "1"`, as `_quoted_choice` reads it
            alternatives.append(_quoted_choices(choices))
    elif node.get("type") in ("integer", "number"):
        if node["type"] == "number":  # YAML's .inf is a number to a validator; check-config refuses it
            if "maximum" not in node and "exclusiveMaximum" not in node:
                node["maximum"] = sys.float_info.max
            if "minimum" not in node and "exclusiveMinimum" not in node:
                node["minimum"] = -sys.float_info.max
        alternatives = [_SUBSTITUTION, _QUOTED_NUMBER]
    elif node.get("type") == "boolean":
        alternatives = [_YES_NO_WORDS]
    else:
        return node
    outside = {key: node.pop(key) for key in _ANNOTATIONS if key in node}
    return {**outside, "anyOf": [node, *alternatives]}
