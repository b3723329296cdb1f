"""First paint on the server: each page's main facts rendered into its HTML.

The coordinator passes a page the same JSON its script would fetch; these functions fill
the page's placeholders with it (every value escaped), so the page is useful with scripts
blocked and in a screenshot taken at load. The script then takes over from the same data
(embedded as JSON) and keeps it fresh. Pure: formatting mirrors explorer.js.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

Json = Mapping[str, Any]

TONE = {
    "available": "ok", "verified": "ok", "running": "ok", "ready": "ok", "passed": "ok",
    "allocated": "info", "provisioning": "info", "starting": "info", "assigned": "info",
    "requested": "info", "verifying": "warn", "claimed": "warn", "healing": "warn",
    "terminating": "warn", "registering": "warn", "interrupted": "warn", "drained": "warn",
    "removed": "bad",
    "offline": "bad", "failed": "bad", "banned": "bad", "lost": "bad", "error": "bad",
}  # fmt: skip


def e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def num(n: object) -> str:
    if n is None:
        return "–"
    try:
        value = float(n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return e(n)
    return f"{value:,.0f}" if value == int(value) else f"{value:,}"


def pct(r: object) -> str:
    if r is None:
        return "–"
    value = float(r)  # type: ignore[arg-type]
    return f"{value * 100:.{1 if 0 < value < 0.1 else 0}f}%"


def credits(text: object) -> str:
    if text is None or text == "":
        return "–"
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        return e(text)
    places = 6 if abs(value) < 1 else 2
    out = f"{value:,.{places}f}".rstrip("0").rstrip(".")
    return out or "0"


def ago(ts: object, now: float | None = None) -> str:
    if not ts:
        return "never"
    d = max(0.0, (now or time.time()) - float(ts))  # type: ignore[arg-type]
    if d < 60:
        return f"{d:.0f} s ago"
    if d < 3600:
        return f"{d / 60:.0f} min ago"
    if d < 86400:
        return f"{d / 3600:.1f} h ago"
    return f"{d / 86400:.0f} d ago"


def badge(state: object) -> str:
    tone = TONE.get(str(state).removeprefix("node "), "")
    return f'<span class="badge {tone}">{e(state)}</span>'


def td(content: str, cls: str = "") -> str:
    return f'<td class="{cls}">{content}</td>' if cls else f"<td>{content}</td>"


# --------------------------------------------------------------------------- filling


def set_inner(page: str, element_id: str, inner: str) -> str:
    """Replace the content of the (non-nested) element with this id."""
    pattern = re.compile(rf'(<(\w+)[^>]*\bid="{re.escape(element_id)}"[^>]*>)(.*?)(</\2>)', re.S)
    return pattern.sub(lambda m: m.group(1) + inner + m.group(4), page, count=1)


def set_tbody(page: str, table_id: str, rows: list[str]) -> str:
    start = page.find(f'id="{table_id}"')
    if start < 0:
        return page
    at = page.find("<tbody></tbody>", start)
    if at < 0:
        return page
    return page[:at] + "<tbody>" + "".join(rows) + "</tbody>" + page[at + len("<tbody></tbody>") :]


def show(page: str, element_id: str, visible: bool) -> str:
    """Drop or keep an `hidden` attribute on an element (e.g. an 'empty' note)."""
    tag = re.compile(rf'<(\w+)([^>]*\bid="{re.escape(element_id)}"[^>]*?)(\s+hidden)?>')
    return tag.sub(lambda m: f"<{m.group(1)}{m.group(2)}{'' if visible else ' hidden'}>", page, 1)


def chips(counts: Mapping[str, int] | None) -> str:
    entries = [(k, n) for k, n in (counts or {}).items() if n > 0]
    if not entries:
        return '<span class="chip none">none</span>'
    return "".join(f'<span class="chip">{badge(k)}<b>{num(n)}</b></span>' for k, n in entries)


# --------------------------------------------------------------------------- pages


def overview(page: str, o: Json) -> str:
    u, sp = o["utilization"], o["supply"]
    ever = sum(o.get("clusters_by_state", {}).values())
    values = {
        "k-nodes": num(u.get("nodes_online")),
        "k-nodes-note": f"of {num(sp.get('nodes_total'))} registered",
        "k-verified": num(sp.get("verified")),
        "k-verified-note": f"{num(sp.get('claimed'))} claimed · {num(sp.get('failed'))} failed",
        "k-gpu": pct(u.get("gpu_ratio")),
        "k-gpu-note": (
            f"{num(u['gpu_allocated'])} of {num(u['gpu_total'])} GPUs in use"
            if u.get("gpu_total")
            else "no GPUs online"
        ),
        "k-cpu": pct(u.get("cpu_ratio")),
        "k-cpu-note": (
            f"{num(u['cpu_allocated'])} of {num(u['cpu_total'])} cores in use"
            if u.get("cpu_total")
            else "no CPUs online"
        ),
        "k-clusters": num(o.get("clusters_running")),
        "k-clusters-note": f"{num(o.get('clusters_live'))} live · {num(ever)} ever",
        "k-hb": f"{float(o.get('heartbeats_per_s', 0)):.1f}",
    }
    for key, value in values.items():
        page = set_inner(page, key, e(value))
    prices = o.get("prices") or []
    rows = [
        "<tr>"
        + td(f'<b>{e(p["model"])}</b><span class="muted small"> per {e(p["unit"])}</span>')
        + td(e(credits(p["median"])), "num")
        + td(
            e(credits(p["low"]))
            if p["low"] == p["high"]
            else f"{e(credits(p['low']))} – {e(credits(p['high']))}",
            "num muted",
        )
        + td(f"{num(p['free'])} / {num(p['devices'])}", "num")
        + "</tr>"
        for p in prices
    ] or ['<tr><td colspan="4" class="empty">Nothing for sale right now.</td></tr>']
    page = set_tbody(page, "prices", rows)
    page = set_inner(page, "node-states", chips(sp.get("nodes_by_state")))
    page = set_inner(page, "device-states", chips(sp.get("devices_by_state")))
    return set_inner(page, "cluster-states", chips(o.get("clusters_by_state")))


def nodes(page: str, rows: list[Json]) -> str:
    now = time.time()
    body = []
    for r in sorted(rows, key=lambda r: str(r.get("name", ""))):
        country = f'<span class="muted"> · {e(r["country"])}</span>' if r.get("country") else ""
        auto = '<span class="muted small"> auto</span>' if r.get("price_auto") else ""
        body.append(
            f'<tr data-id="{e(r["id"])}" data-state="{e(r["state"])}">'
            + td(
                f'<a href="/nodes/{e(r["id"])}">{e(r["name"])}</a>'
                f'<div class="muted small mono">{e(str(r["id"])[:12])}</div>'
            )
            + td(badge(r["state"]))
            + td(e(r.get("region")) + country)
            + td(e(r.get("gpu_models")))
            + td(num(r.get("cpu_cores")), "num")
            + td(f"{num(r.get('verified'))} / {num(r.get('devices'))}", "num")
            + td(e(credits(r.get("price"))) + auto, "num")
            + td(pct(r.get("reliability")), "num")
            + td(ago(r.get("last_heartbeat"), now), "num muted")
            + "</tr>"
        )
    page = set_tbody(page, "nodes", body)
    page = set_inner(page, "count", f"{len(rows)} of {len(rows)} nodes")
    return show(page, "empty", not rows)


def node(page: str, n: Json) -> str:
    earnings = n.get("earnings") or {}
    values = {
        "crumb": str(n["id"])[:16],
        "title": n.get("name"),
        "subtitle": n["gpu_models"] if n.get("gpu_models") not in (None, "—") else "CPU node",
        "k-state-note": f"since {ago(n.get('state_changed_at'))}",
        "k-rel": pct(n.get("reliability")),
        "k-price": credits(n.get("price")),
        "k-price-note": (
            "auto: follows the network median" if n.get("price_auto") else "set by the owner"
        ),
        "k-earn": credits(earnings.get("settled")),
    }
    for key, value in values.items():
        page = set_inner(page, key, e(value))
    page = set_inner(page, "k-state", badge(n.get("state")))
    page = re.sub(
        r"<title>[^<]*</title>", f"<title>{e(n.get('name'))} · Loom explorer</title>", page
    )
    facts = [
        ("Node id", f'<span class="mono">{e(n["id"])}</span>'),
        ("Region", e(n.get("region")) + (f" · {e(n['country'])}" if n.get("country") else "")),
        ("CPU", f"{e(n.get('cpu_model') or 'unknown')} · {num(n.get('cpu_cores'))} cores"),
        ("Memory", f"{num(n.get('ram_gb'))} GB RAM"),
        ("Heartbeats", f"{num(n.get('heartbeats'))} · last {ago(n.get('last_heartbeat'))}"),
    ]
    page = set_inner(page, "facts", "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts))
    devices = []
    for d in n.get("device_list") or []:
        kind = "CPU" if d.get("kind") == "cpu" else f"GPU {e(d.get('index'))}"
        memory = (
            f"{num(d.get('cores'))} cores"
            if d.get("kind") == "cpu"
            else (f"{e(d['vram_gb'])} GB" if d.get("vram_gb") else "–")
        )
        devices.append(
            f'<tr data-state="{e(d.get("state"))}">'
            + td(kind)
            + td(f"<b>{e(d.get('model'))}</b>")
            + td(memory, "num")
            + td(badge(d.get("state")))
            + td(f"{num(d.get('allocated_units'))} / {num(d.get('units'))}", "num")
            + "</tr>"
        )
    return set_tbody(page, "devices", devices)


def clusters(page: str, rows: list[Json]) -> str:
    now = time.time()
    body = [
        f'<tr data-id="{e(r["id"])}" data-state="{e(r["state"])}">'
        + td(f'<a href="/clusters/{e(r["id"])}" class="mono">{e(r["id"])}</a>')
        + td(badge(r["state"]))
        + td(num(r.get("nodes")), "num")
        + td(f'{e(r.get("models"))}<span class="muted small"> · {num(r.get("units"))} units</span>')
        + td(e(r.get("regions") or "–"))
        + td(e(credits(r.get("price_per_hour"))), "num")
        + td(e(credits(r.get("cost_so_far"))), "num")
        + td(ago(r.get("created_at"), now), "num muted")
        + "</tr>"
        for r in rows
    ]
    page = set_tbody(page, "clusters", body)
    page = set_inner(page, "count", f"{len(rows)} of {len(rows)} clusters")
    return show(page, "empty", not rows)


def cluster(page: str, c: Json) -> str:
    values = {
        "crumb": c["id"],
        "title": f"Cluster {c['id']}",
        "k-members": f"{num(c.get('members_ready'))} ready",
        "k-members-note": (
            f"{num(c.get('nodes'))} nodes live · {num(c.get('members_total'))} members ever"
        ),
        "k-price": credits(c.get("price_per_hour")),
        "k-price-note": f"{c.get('models')} · {num(c.get('units'))} units",
        "k-cost": credits(c.get("cost_so_far")),
        "k-cost-note": f"{credits(c.get('settled'))} settled",
    }
    for key, value in values.items():
        page = set_inner(page, key, e(value))
    page = set_inner(page, "k-state", badge(c.get("state")))
    members = [
        f'<tr data-state="{e(m.get("state"))}">'
        + td(e(m.get("role")))
        + td(
            f'<a href="/nodes/{e(m.get("node_id"))}" class="mono">'
            f"{e(str(m.get('node_id', ''))[:12])}</a>"
        )
        + td(badge(m.get("state")))
        + td(f'{e(m.get("model"))}<span class="muted small"> × {num(m.get("units"))}</span>')
        + td(e(m.get("region") or "–"))
        + td(e(credits(m.get("price"))), "num")
        + "</tr>"
        for m in c.get("members") or []
    ]
    return set_tbody(page, "members", members)


LEDGER_LABELS = (
    ("minted", "Minted", "credit ever deposited"),
    ("user_balances", "User balances", "spendable"),
    ("escrow", "In escrow", "held for running clusters"),
    ("earned_by_suppliers", "Earned by suppliers", "settled, net of fees"),
    ("earnings_unpaid", "Earnings unpaid", "not withdrawn yet"),
    ("fees", "Platform fees", ""),
    ("paid_out", "Paid out", "left Loom"),
)


def ledger(page: str, s: Json) -> str:
    totals = s.get("totals") or {}
    kpis = "".join(
        f'<div class="kpi"><span class="label">{label}</span><b>{e(credits(totals.get(k)))}</b>'
        f'<span class="note">{note}</span></div>'
        for k, label, note in LEDGER_LABELS
    )
    page = set_inner(page, "totals", kpis)
    page = set_inner(page, "kinds", chips(s.get("by_kind")))
    now = time.time()
    rows = []
    for t in s.get("latest") or []:
        entries = "".join(
            f'<span class="{"pos" if Decimal(str(x["amount"])) > 0 else "neg"}" '
            f'title="{e(x["account"])}">{e(x["amount"])} {e(_short(str(x["account"])))}</span>'
            for x in t.get("entries") or []
        )
        rows.append(
            f'<tr data-seq="{e(t["seq"])}">'
            + td(num(t["seq"]), "num")
            + td(ago(t.get("at"), now), "nowrap")
            + td(f'<span class="badge">{e(t["kind"])}</span>')
            + td(e(credits(t.get("amount"))), "num")
            + td(f'<div class="entries">{entries}</div>')
            + td(f'<span class="hash" title="{e(t["hash"])}">{e(str(t["hash"])[:12])}…</span>')
            + "</tr>"
        )
    page = set_tbody(page, "txns", rows)
    return show(page, "empty", not rows)


def _short(account: str) -> str:
    kind, _, rest = account.partition(":")
    return f"{kind}:{rest[:10]}…" if len(rest) > 14 else account


RENDERERS: dict[str, Callable[[str, Any], str]] = {
    "overview": overview,
    "nodes": nodes,
    "node": node,
    "clusters": clusters,
    "cluster": cluster,
    "ledger": ledger,
}
