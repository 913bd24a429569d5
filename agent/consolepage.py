"""The web console's page (`agent.console`): HTML, CSS and JS in one response; nothing else is fetched
but the JSON API. They are kept in `agent/data/console.{html,css,js}`; the CSS and JS are inlined where
the HTML says @CSS@ and @JS@ (`PAGE_BYTES`), and `PAGE_CSP`, the page's Content-Security-Policy, allows
exactly those two by their hashes. Read once, when the console is imported.

Imports nothing from the project.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources


def _page_part(name: str) -> str:
    return importlib.resources.files("agent").joinpath("data", name).read_text("utf-8")


_CSS = _page_part("console.css")
_JS = _page_part("console.js")
_HTML = _page_part("console.html")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


PAGE_BYTES = _HTML.replace("@CSS@", _CSS).replace("@JS@", _JS).encode("utf-8")
PAGE_CSP = (f"default-src 'none'; script-src {_csp_hash(_JS)}; style-src {_csp_hash(_CSS)}; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
