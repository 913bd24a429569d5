"""The web console's JSON API (`agent.console`): the endpoints (`_ROUTES`: /api, /api/status,
/api/history, /api/alarms) and the parameters each takes, checked (`_query`, `_number`), and
`ApiError`, an error answered as JSON with an HTTP status. The documents themselves are
`agent.console.Console`'s.

Imports `agent.consolehistory` (`HISTORY_HOURS`) and, for type checking only, `agent.console`
(`Console`); nothing else from the project.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from agent.consolehistory import HISTORY_HOURS

if TYPE_CHECKING:
    from agent.console import Console

RECENT_ALARMS = 50
_CHANNEL_RE = re.compile(r"[a-z0-9_-]{1,64}\.[A-Za-z0-9_]{1,64}")
_NUMBER_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _query(raw: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """Query parameters, each at most once, only the allowed names. Empty fields (`a=1&`, `&&`) are
    nothing, as browsers and scripts that build queries leave them."""
    raw = "&".join(field for field in raw.split("&") if field)
    if not raw:
        return {}
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=True, max_num_fields=10)
    except ValueError:
        raise ApiError(400, "malformed query string") from None
    out = {}
    for name, values in parsed.items():
        if name not in allowed:
            hint = f"; allowed: {', '.join(allowed)}" if allowed else "; this endpoint takes none"
            raise ApiError(400, f"unknown parameter {name[:40]!r}{hint}")
        if len(values) != 1:
            raise ApiError(400, f"parameter {name!r} given {len(values)} times")
        out[name] = values[0]
    return out


def _number(params: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    text = params.get(name)
    if text is None:
        return float(default)
    if not _NUMBER_RE.fullmatch(text):
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}")
    value = float(text)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}")
    return value


def _api_status(console: Console, params: dict[str, str]) -> dict[str, Any]:
    return console.status_document()


def _api_history(console: Console, params: dict[str, str]) -> dict[str, Any]:
    channel = params.get("channel")
    if not channel:
        raise ApiError(400, "missing parameter 'channel' (DEVICE.CHANNEL, e.g. cod.w01018)")
    if not _CHANNEL_RE.fullmatch(channel):
        raise ApiError(400, "channel must be DEVICE.CHANNEL, e.g. cod.w01018")
    hours = _number(params, "hours", HISTORY_HOURS, 0, HISTORY_HOURS)
    if hours <= 0:
        raise ApiError(400, f"hours must be a number from 0 to {HISTORY_HOURS} (not 0)")
    return console.history_document(channel, hours)


def _api_alarms(console: Console, params: dict[str, str]) -> dict[str, Any]:
    limit = _number(params, "limit", RECENT_ALARMS, 1, 500)
    if not limit.is_integer():
        raise ApiError(400, "limit must be a whole number from 1 to 500")
    return console.alarms_document(int(limit))


def _api_index(console: Console, params: dict[str, str]) -> dict[str, Any]:
    return {"endpoints": {
        "/api/status": "the `edge-agent status --json` document plus a `console` key",
        "/api/history?channel=DEVICE.CHANNEL&hours=N": f"1-minute avg/min/max of the last N hours (<= {HISTORY_HOURS})",
        "/api/alarms?limit=N": "active alarms and the latest N alarm events (default 50, at most 500)",
    }}


_ROUTES: dict[str, tuple[Callable[[Console, dict[str, str]], dict[str, Any]], tuple[str, ...]]] = {
    "/api": (_api_index, ()),
    "/api/status": (_api_status, ()),
    "/api/history": (_api_history, ("channel", "hours")),
    "/api/alarms": (_api_alarms, ("limit",)),
}
