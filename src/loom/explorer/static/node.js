/* One node: hardware, verification history, reliability, earnings, state timeline. */
"use strict";
(() => {
  const { api, $, h, setText, badge, num, credits, ago, pct, dur, when, rate, timeline } = L;
  const id = L.lastSegment();
  setText("crumb", id.slice(0, 16));

  function facts(n) {
    const rows = [
      ["Node id", h("span", { class: "mono" }, n.id)],
      ["Owner key", h("span", { class: "mono" }, n.owner)],
      ["Region", n.region + (n.country ? " · " + n.country : "")],
      ["CPU", (n.cpu_model || "unknown") + " · " + num(n.cpu_cores) + " cores"],
      ["Memory", num(n.ram_gb) + " GB RAM · " + num(n.disk_free_gb) + " GB disk free"],
      ["Agent", (n.agent_version || "?") + " · protocol " + n.protocol],
      ["Registered", when(n.registered_at)],
      ["Connected since", n.connected_since ? when(n.connected_since) : "not connected"],
      ["Heartbeats", num(n.heartbeats) + " · last " + ago(n.last_heartbeat)],
    ];
    $("facts").replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function devices(list) {
    $("devices").querySelector("tbody").replaceChildren(...list.map((d) => h("tr", { "data-state": d.state },
      h("td", {}, d.kind === "cpu" ? "CPU" : "GPU " + d.index, d.declared ? h("span", { class: "muted small" }, " declared") : null),
      h("td", {}, h("b", {}, d.model), d.name && d.name !== d.model ? h("div", { class: "muted small" }, d.name) : null),
      h("td", { class: "num" }, d.kind === "cpu" ? num(d.cores) + " cores" : d.vram_gb ? d.vram_gb + " GB" : "–"),
      h("td", {}, badge(d.state)),
      h("td", { class: "num" }, num(d.allocated_units) + " / " + num(d.units)))));
  }

  function challenges(list) {
    $("no-challenges").hidden = list.length > 0;
    $("challenges").querySelector("tbody").replaceChildren(...list.map((c) => h("tr", { "data-outcome": c.outcome },
      h("td", { title: when(c.ended_at), class: "nowrap" }, ago(c.ended_at)),
      h("td", {}, c.device_id.split(":").pop()),
      h("td", {}, c.device_class),
      h("td", {}, c.trigger),
      h("td", {}, badge(c.outcome), c.reason ? h("div", { class: "muted small" }, c.reason) : null),
      h("td", { class: "num" }, rate(c.measured_rate)),
      h("td", { class: "num muted" }, rate(c.required_rate)),
      h("td", { class: "num" }, num(c.openings_checked) + (c.openings_failed ? " (" + c.openings_failed + " bad)" : "")),
      h("td", { class: "num muted" }, dur(c.duration_s)))));
  }

  L.poll(async () => {
    const n = await api("/nodes/" + encodeURIComponent(id));
    document.title = n.name + " · Loom explorer";
    setText("title", n.name);
    setText("subtitle", n.gpu_models !== "—" ? n.gpu_models : "CPU node");
    $("k-state").replaceChildren(badge(n.state));
    setText("k-state-note", "since " + ago(n.state_changed_at));
    setText("k-rel", pct(n.reliability));
    const ri = n.reliability_inputs;
    setText("k-rel-note", ri ? "uptime " + pct(ri.uptime) + " · " + ri.challenges_passed + " passed, " + ri.challenges_failed + " failed" : "");
    setText("k-price", credits(n.price));
    setText("k-price-note", n.price_auto ? "auto: follows the network median" : "set by the owner");
    setText("k-earn", credits(n.earnings.settled));
    setText("k-earn-note", credits(n.earnings.paid) + " net of fees · " + credits(n.earnings.accrued) + " accrued");
    facts(n);
    devices(n.device_list);
    challenges(n.challenges);
    timeline($("timeline"), n.events, true);
  }, 5000);
})();
