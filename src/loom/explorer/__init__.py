"""The explorer's pages and assets (HTML, CSS, JS, SVG), shipped inside the package so the
coordinator serves them with no internet. Pure: reads its own files, imports nothing of
Loom. The coordinator's routes live in ``loom.coordinator.api.explorer``.
"""

from __future__ import annotations

import functools
import html
import json
import re
from importlib import resources
from string import Template
from typing import Any

from loom.explorer import render

PAGES = ("overview", "nodes", "node", "clusters", "cluster", "ledger")
NAV = (("overview", "/", "Network"), ("nodes", "/nodes", "Nodes"),
       ("clusters", "/clusters", "Clusters"), ("ledger", "/ledger", "Ledger"))  # fmt: skip
_SECTION = {"node": "nodes", "cluster": "clusters"}
_CONTENT_TYPES = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(css|js|svg)")


@functools.cache
def _read(relative: str) -> bytes:
    return (resources.files(__name__) / relative).read_bytes()


def page(name: str, title: str, data: Any = None, api_path: str = "") -> str:
    """The HTML of one page: the layout around the page's body, with its script.

    With `data` (what the page's script would fetch from `/explorer/api{api_path}`), the
    page's first view is rendered here, and the data is embedded for the script's first
    tick, so the page is complete at first paint, scripts or not."""
    if name not in PAGES:
        raise KeyError(name)
    section = _SECTION.get(name, name)
    nav = "\n".join(
        f'<a href="{href}"{" class=active" if key == section else ""}>{label}</a>'
        for key, href, label in NAV
    )
    layout = Template(_read("templates/layout.html").decode())
    initial = ""
    if data is not None:
        # "<" escaped: the JSON can never close its <script> element.
        blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
        initial = (
            f'<script type="application/json" id="initial-data" '
            f'data-path="{html.escape(api_path)}">{blob}</script>'
        )
    out = layout.substitute(
        title=html.escape(title),
        nav=nav,
        page=name,
        body=_read(f"templates/{name}.html").decode(),
        initial=initial,
    )
    return render.RENDERERS[name](out, data) if data is not None else out


def static(name: str) -> tuple[bytes, str] | None:
    """(content, content type) of a static asset, or None for an unknown name."""
    match = _STATIC_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return _read(f"static/{name}"), _CONTENT_TYPES[match.group(1)]
    except (FileNotFoundError, IsADirectoryError):
        return None
