"""The explorer in a real headless Chromium (Debian's `chromium`, driven by Playwright):
a real coordinator, real agent processes (hardware-verified CPUs, one SIGKILLed to watch
the overview update live) and protocol-level fake GPU agents that run a cluster. Every
page is screenshotted under test-artifacts/explorer/; no page may log a console error.
The coordinator's and an agent's /metrics are scraped and parsed with the Prometheus
text parser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.protocol.api import NodeOut
from support.fakeagent import FakeAgents, force_available
from support.servers import AgentProcess, CoordinatorThread, free_port, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "explorer"
UI_TIMEOUT_MS = 60_000

needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing: apt-get install chromium (the Makefile does) for these tests",
)


@pytest.fixture
def settings(db_url: str) -> Settings:
    # A short heartbeat timeout, so a killed agent goes offline within seconds; utilization
    # sampled every 2 s instead of every minute, so the chart has points; CPUs proved in the
    # small `test` challenge class (real prover, real protocol), so two loaded cores pass.
    return Settings(
        db_url=db_url,
        port=free_port(),
        heartbeat_timeout_s=4.0,
        heartbeat_interval_s=1.0,
        heartbeat_flush_s=0.2,
        watchdog_interval_s=0.25,
        faucet=True,
        tune_gc=False,
        restart_grace_s=0.0,
        extra={"explorer_sample_s": "2", "challenge.cpu_class": "test"},
    )


def metrics_of(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name → [(labels, value)] for every sample of a Prometheus text endpoint."""
    text = httpx.get(url, timeout=30).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], metric: str, /, **labels: str
) -> float:
    return sum(
        v for lab, v in samples.get(metric, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_explorer_json_is_public_and_static_assets_are_safe(coordinator: CoordinatorThread) -> None:
    """No signature needed; private cluster facts never leak; asset names cannot escape."""
    base = coordinator.url
    for path in ("/", "/nodes", "/nodes/x", "/clusters", "/clusters/x", "/ledger"):
        page = httpx.get(base + path, timeout=30)
        assert page.status_code == 200 and "<title>" in page.text
        assert "http://" not in page.text.replace(base, "") and "https://" not in page.text
    for name in ("explorer.css", "explorer.js", "overview.js", "logo.svg"):
        assert httpx.get(f"{base}/explorer/static/{name}", timeout=30).status_code == 200
    for bad in ("..%2Fapi%2Fexplorer.py", "layout.html", "x.py", ".hidden.js"):
        assert httpx.get(f"{base}/explorer/static/{bad}", timeout=30).status_code == 404
    overview = httpx.get(base + "/explorer/api/overview", timeout=30).json()
    assert overview["supply"]["nodes_total"] == 0 and overview["clusters_running"] == 0
    missing = httpx.get(base + "/explorer/api/clusters/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "cluster_not_found"
    scraped = metrics_of(base + "/metrics")
    assert value(scraped, "loom_heartbeats_total") == 0
    assert (
        value(scraped, "loom_api_request_duration_seconds_count", route="/explorer/api/overview")
        == 1
    )


def test_pages_render_their_data_on_the_server_and_docs_are_offline(
    coordinator: CoordinatorThread, client: LoomClient, fakes: FakeAgents
) -> None:
    """The HTML itself carries the first view (no script needed) and /docs needs no CDN."""
    for name in ("gpu-a", "gpu-b"):
        fakes.add(name, gpus=["rtx4090"], price="0.40", region="eu-west")
    coordinator.run_coro(
        force_available(coordinator.state.sessions, [n.node_id for n in fakes.nodes])
    )
    base = coordinator.url
    page = httpx.get(base + "/nodes", timeout=30).text
    tbody = page.split('id="nodes"', 1)[1].split("</tbody>", 1)[0]
    assert "gpu-a" in tbody and "gpu-b" in tbody and tbody.count("<tr ") == 2
    assert '<p class="empty" id="empty" hidden>' in page
    assert 'id="initial-data" data-path="/nodes"' in page
    overview = httpx.get(base + "/", timeout=30).text
    assert '<b id="k-nodes">2</b>' in overview and "rtx4090" in overview
    node_id = fakes.nodes[0].node_id
    detail = httpx.get(f"{base}/nodes/{node_id}", timeout=30).text
    assert '<h1 id="title">gpu-a</h1>' in detail
    docs = httpx.get(base + "/docs", timeout=30)
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        got = httpx.get(f"{base}/docs/assets/{asset}", timeout=30)
        assert got.status_code == 200 and len(got.content) > 10_000
    assert httpx.get(f"{base}/docs/assets/index.j2", timeout=30).status_code == 404


@pytest.fixture
def real_agents(
    coordinator: CoordinatorThread, tmp_path: Path
) -> Iterator[dict[str, tuple[AgentProcess, int]]]:
    """Two real agents (`loom worker start`), by name, with their metrics ports."""
    agents: dict[str, tuple[AgentProcess, int]] = {}
    try:
        for name in ("real-1", "real-2"):
            port = free_port()
            agents[name] = (
                AgentProcess(
                    tmp_path / name, coordinator.url, name, "--region", "us-east",
                    "--price", "0.05", "--metrics-port", str(port),
                ),
                port,
            )  # fmt: skip
        yield agents
    finally:
        for agent, _ in agents.values():
            agent.ensure_dead()


def _node(client: LoomClient, name: str) -> NodeOut | None:
    return next((n for n in client.nodes() if n.name == name), None)


def _cpu_verified(client: LoomClient, name: str) -> NodeOut | None:
    node = _node(client, name)
    if node is None or node.state != "available":
        return None
    return node if any(d.kind == "cpu" and d.verified for d in node.devices) else None


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_explorer_pages_in_chromium(
    coordinator: CoordinatorThread,
    client: LoomClient,
    fakes: FakeAgents,
    real_agents: dict[str, tuple[AgentProcess, int]],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import ConsoleMessage, Page, sync_playwright

    # --- the network: two fake GPU nodes running a cluster, two real verified CPU nodes
    for name in ("gpu-a", "gpu-b"):
        fakes.add(name, gpus=["rtx4090"], price="0.40", region="eu-west")
    coordinator.run_coro(
        force_available(coordinator.state.sessions, [n.node_id for n in fakes.nodes])
    )
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    created = client.create_cluster(
        {"name": "explorer-demo", "nodes": 2, "resources": {"gpu": "rtx4090"}, "duration": "1h"}
    )
    running = client.wait_cluster(created.id, timeout=60)
    assert running.state == "running"
    real = {
        name: wait_for(lambda n=name: _cpu_verified(client, n), 180, f"{name} verified", 1.0)
        for name in real_agents
    }

    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    problems: list[str] = []

    def watch(page: Page) -> None:
        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error":
                problems.append(f"{page.url}: console error: {msg.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: problems.append(f"{page.url}: page error: {exc}"))

    def shot(page: Page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def visit(page: Page, path: str) -> None:
        page.goto(coordinator.url + path, wait_until="load")
        page.wait_for_selector("#live.on", timeout=UI_TIMEOUT_MS)

    base = coordinator.url
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            watch(page)

            # --- overview: counts, verified devices, utilization, price index, cluster running
            visit(page, "/")
            page.wait_for_function("document.getElementById('k-nodes').textContent === '4'")
            page.wait_for_function("document.getElementById('k-clusters').textContent === '1'")
            assert int(page.text_content("#k-verified") or "0") >= 4  # 2 fake GPUs, 2 real CPUs
            assert page.text_content("#k-gpu") == "100%"
            assert "2 of 2 GPUs" in (page.text_content("#k-gpu-note") or "")
            prices = page.text_content("#prices") or ""
            assert "rtx4090" in prices and "cpu" in prices
            assert page.locator("#by-model .barrow").count() == 2
            assert page.locator("#by-region .barrow").count() == 2
            page.wait_for_selector("#util-chart svg path.l1", state="attached")  # may be flat
            shot(page, "overview")

            # --- nodes: list, filter, sort, then a real agent's page with its verification
            visit(page, "/nodes")
            page.wait_for_function("document.querySelectorAll('#nodes tbody tr').length === 4")
            page.fill("#q", "real-")
            assert page.locator("#nodes tbody tr").count() == 2
            page.fill("#q", "")
            page.select_option("#state", "allocated")
            assert page.locator("#nodes tbody tr").count() == 2
            page.select_option("#state", "")
            page.click("#nodes th[data-key=name]")  # name, descending now
            names = page.locator("#nodes tbody tr td:first-child a").all_text_contents()
            assert names == sorted(names, reverse=True) and len(names) == 4
            shot(page, "nodes")

            real_1 = real["real-1"]
            visit(page, f"/nodes/{real_1.id}")
            page.wait_for_selector("#devices tbody tr[data-state=verified]")
            page.wait_for_selector("#challenges tbody tr[data-outcome=passed]")
            assert page.text_content("#title") == "real-1"
            assert "verified" in (page.text_content("#devices") or "")
            timeline = page.text_content("#timeline") or ""
            assert "available" in timeline and "verifying" in timeline
            shot(page, "node")

            # --- clusters: the list and the cluster's aggregate page
            visit(page, "/clusters")
            page.wait_for_selector(
                f"#clusters tbody tr[data-id='{created.id}'][data-state=running]"
            )
            shot(page, "clusters")
            visit(page, f"/clusters/{created.id}")
            page.wait_for_function(
                "document.querySelectorAll('#members tbody tr[data-state=ready]').length === 2"
            )
            assert "running" in (page.text_content("#timeline") or "")
            assert "rtx4090" in (page.text_content("#members") or "")
            body = page.text_content("body") or ""
            assert "explorer-demo" not in body and client.key.public_hex not in body  # private
            shot(page, "cluster")

            # --- ledger: verified chain, deposit and hold
            visit(page, "/ledger")
            page.wait_for_selector("#verify[data-ok=true]")
            assert "Hash chain verified" in (page.text_content("#verify") or "")
            kinds = page.text_content("#kinds") or ""
            assert "deposit" in kinds and "hold" in kinds
            assert page.locator("#txns tbody tr").count() >= 2
            shot(page, "ledger")

            # --- first paint: with scripts blocked, every page shows its data (server-rendered)
            still = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                bare = still.new_page(java_script_enabled=False)

                def static_text(path: str, selector: str) -> str:
                    bare.goto(base + path, wait_until="load")
                    return bare.text_content(selector) or ""

                assert static_text("/", "#k-nodes") == "4"
                assert static_text("/", "#k-clusters") == "1"
                assert "rtx4090" in static_text("/", "#prices")
                nodes_html = static_text("/nodes", "#nodes tbody")
                assert all(n in nodes_html for n in ("gpu-a", "gpu-b", "real-1", "real-2"))
                assert bare.locator("#nodes tbody tr").count() == 4
                assert static_text(f"/nodes/{real_1.id}", "#title") == "real-1"
                assert "verified" in (bare.text_content("#devices") or "")
                assert "running" in static_text(
                    "/clusters", f"#clusters tr[data-id='{created.id}']"
                )
                members = static_text(f"/clusters/{created.id}", "#members")
                assert (
                    "rtx4090" in members
                    and bare.locator("#members tr[data-state=ready]").count() == 2
                )
                assert "hold" in static_text("/ledger", "#kinds")
                assert bare.locator("#txns tbody tr").count() >= 2
                bare.screenshot(path=str(ARTIFACTS / "ledger-no-script.png"), full_page=True)
            finally:
                still.close()

            # --- live: SIGKILL an agent; the open overview follows without a reload
            visit(page, "/")
            page.wait_for_function("document.getElementById('k-nodes').textContent === '4'")
            page.evaluate("window.__sameDocument = true")
            victim = real_agents["real-2"][0]
            victim.kill()
            victim.wait(30)
            page.wait_for_function("document.getElementById('k-nodes').textContent === '3'")
            page.wait_for_function(
                "document.getElementById('node-states').textContent.includes('offline')"
            )
            assert page.evaluate("window.__sameDocument === true")  # no reload happened
            shot(page, "overview-after-kill")
        finally:
            context.close()

    assert problems == [], "\n".join(problems)

    # --- metrics: the coordinator's and a live agent's, parsed as Prometheus text
    coord = metrics_of(f"{base}/metrics")
    assert value(coord, "loom_nodes", state="offline") == 1
    assert value(coord, "loom_nodes", state="allocated") == 2
    assert value(coord, "loom_clusters", state="running") == 1
    assert value(coord, "loom_devices", kind="cpu", state="verified") >= 2
    assert value(coord, "loom_challenges_total", outcome="passed") >= 2
    assert value(coord, "loom_heartbeats_total") > 0
    assert value(coord, "loom_placement_duration_seconds_count", outcome="placed") >= 1
    assert (
        value(coord, "loom_api_request_duration_seconds_count", route="/explorer/api/overview") > 0
    )
    assert value(coord, "loom_ledger_credits", bucket="minted") == 1000
    assert value(coord, "loom_ledger_transactions_total", kind="hold") == 1
    agent = metrics_of(f"http://127.0.0.1:{real_agents['real-1'][1]}/metrics")
    assert value(agent, "loom_agent_connected") == 1
    assert value(agent, "loom_agent_devices", kind="cpu") == 1
    assert value(agent, "loom_agent_info", name="real-1") == 1
    assert "loom_agent_members" in agent
