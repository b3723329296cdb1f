/* Nodes: the whole list, sorted and filtered in the browser; refreshed every 5 s. */
"use strict";
(() => {
  const { api, $, h, setText, badge, num, credits, ago, pct, sortable } = L;
  const table = $("nodes"), tbody = table.querySelector("tbody"), q = $("q"), sel = $("state");
  const params = new URLSearchParams(location.search);
  q.value = params.get("q") || "";
  let rows = [], wanted = params.get("state") || "";
  const sort = sortable(table, "name", 1, render);

  function matches(r, text) {
    return !text || [r.name, r.id, r.region, r.country, r.gpu_models, r.state, r.owner].join(" ").toLowerCase().includes(text);
  }

  function render() {
    const text = q.value.trim().toLowerCase(), st = sel.value;
    const shown = sort(rows.filter((r) => (!st || r.state === st) && matches(r, text)));
    tbody.replaceChildren(...shown.map((r) => h("tr", { "data-id": r.id, "data-state": r.state },
      h("td", {}, h("a", { href: "/nodes/" + encodeURIComponent(r.id) }, r.name), h("div", { class: "muted small mono" }, r.id.slice(0, 12))),
      h("td", {}, badge(r.state)),
      h("td", {}, r.region, r.country ? h("span", { class: "muted" }, " · " + r.country) : null),
      h("td", {}, r.gpu_models),
      h("td", { class: "num" }, num(r.cpu_cores)),
      h("td", { class: "num" }, num(r.verified) + " / " + num(r.devices)),
      h("td", { class: "num" }, credits(r.price), r.price_auto ? h("span", { class: "muted small" }, " auto") : null),
      h("td", { class: "num" }, pct(r.reliability)),
      h("td", { class: "num muted" }, ago(r.last_heartbeat)))));
    setText("count", shown.length + " of " + rows.length + " nodes");
    $("empty").hidden = rows.length > 0;
  }

  function syncStates() {
    const states = [...new Set(rows.map((r) => r.state).concat(wanted ? [wanted] : []))].sort();
    const current = sel.value || wanted;
    sel.replaceChildren(h("option", { value: "" }, "all states"), ...states.map((s) => h("option", { value: s }, s)));
    sel.value = current; wanted = "";
  }

  q.addEventListener("input", render);
  sel.addEventListener("change", render);
  L.poll(async () => { rows = await api("/nodes"); syncStates(); render(); }, 5000);
})();
