/* The overview: polls /explorer/api/overview every 2 s, the 24 h samples every 10 s. */
"use strict";
(() => {
  const { api, $, h, setText, pct, num, credits, chips, bars, chart, spark } = L;
  let util = null, utilFetched = 0, beats = [];

  const parts = (c) => [[c.verified || 0, "ok-bg", "verified"], [c.claimed || 0, "warn-bg", "claimed"], [c.failed || 0, "bad-bg", "failed"]];
  const ratio = (a, t) => (t ? a / t : null);

  function drawChart() {
    if (!util) return;
    // The last 24 h, or less when the record is younger: zoom to what there is.
    const t1 = util.at, first = util.samples.length ? util.samples[0].at : t1;
    const t0 = Math.max(t1 - 24 * 3600, Math.min(first - 60, t1 - 15 * 60));
    setText("util-title", t1 - t0 >= 23.9 * 3600 ? "Utilization, last 24 hours" : "Utilization since " + new Date(t0 * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
    const gpu = util.samples.map((x) => [x.at, ratio(x.gpu_allocated, x.gpu_total)]);
    const cpu = util.samples.map((x) => [x.at, ratio(x.cpu_allocated, x.cpu_total)]);
    gpu.push([t1, util.now.gpu_ratio]); cpu.push([t1, util.now.cpu_ratio]);
    chart($("util-chart"), [{ points: gpu, cls: "l1", area: "a1", dot: "dot1" }, { points: cpu, cls: "l2", dot: "dot2" }], t0, t1);
  }

  function sellable(rows) {
    const body = $("prices").querySelector("tbody");
    if (!rows.length) { body.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "empty" }, "Nothing for sale right now."))); return; }
    body.replaceChildren(...rows.map((p) => h("tr", {},
      h("td", {}, h("b", {}, p.model), h("span", { class: "muted small" }, " per " + p.unit)),
      h("td", { class: "num" }, credits(p.median)),
      h("td", { class: "num muted" }, p.low === p.high ? credits(p.low) : credits(p.low) + " – " + credits(p.high)),
      h("td", { class: "num" }, num(p.free) + " / " + num(p.devices)))));
  }

  async function step() {
    const o = await api("/overview");
    const u = o.utilization, sp = o.supply;
    setText("k-nodes", num(u.nodes_online));
    setText("k-nodes-note", "of " + num(sp.nodes_total) + " registered");
    setText("k-verified", num(sp.verified));
    setText("k-verified-note", num(sp.claimed) + " claimed · " + num(sp.failed) + " failed");
    setText("k-gpu", pct(u.gpu_ratio));
    setText("k-gpu-note", u.gpu_total ? num(u.gpu_allocated) + " of " + num(u.gpu_total) + " GPUs in use" : "no GPUs online");
    setText("k-cpu", pct(u.cpu_ratio));
    setText("k-cpu-note", u.cpu_total ? num(u.cpu_allocated) + " of " + num(u.cpu_total) + " cores in use" : "no CPUs online");
    setText("k-clusters", num(o.clusters_running));
    setText("k-clusters-note", num(o.clusters_live) + " live · " + num(Object.values(o.clusters_by_state).reduce((a, b) => a + b, 0)) + " ever");
    setText("k-hb", o.heartbeats_per_s.toFixed(1));
    bars($("by-model"), Object.entries(sp.devices_by_model).map(([name, c]) => ({ name, parts: parts(c) })));
    bars($("by-region"), Object.entries(sp.devices_by_region).map(([name, c]) => ({ name, parts: parts(c) })));
    sellable(o.prices);
    chips($("node-states"), sp.nodes_by_state);
    chips($("device-states"), sp.devices_by_state);
    chips($("cluster-states"), o.clusters_by_state);

    if (!util || Date.now() - utilFetched > 10000) {
      util = await api("/utilization");
      utilFetched = Date.now();
      beats = util.heartbeats.map(([, r]) => r);
    } else {
      util.now = u; util.at = o.at;
    }
    beats.push(o.heartbeats_per_s); beats = beats.slice(-150);
    spark($("hb-spark"), beats);
    drawChart();
  }

  window.addEventListener("resize", drawChart);
  L.poll(step, 2000);
})();
