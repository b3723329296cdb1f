/* Clusters: aggregate facts of every cluster, sorted and filtered in the browser. */
"use strict";
(() => {
  const { api, $, h, setText, badge, num, credits, ago, sortable } = L;
  const table = $("clusters"), tbody = table.querySelector("tbody"), q = $("q"), sel = $("state");
  let rows = [];
  const sort = sortable(table, "created_at", -1, render);

  function render() {
    const text = q.value.trim().toLowerCase(), st = sel.value;
    const shown = sort(rows.filter((r) => (!st || r.state === st) && (!text || [r.id, r.models, r.regions, r.state].join(" ").toLowerCase().includes(text))));
    tbody.replaceChildren(...shown.map((r) => h("tr", { "data-id": r.id, "data-state": r.state },
      h("td", {}, h("a", { href: "/clusters/" + encodeURIComponent(r.id), class: "mono" }, r.id)),
      h("td", {}, badge(r.state)),
      h("td", { class: "num" }, num(r.nodes)),
      h("td", {}, r.models, h("span", { class: "muted small" }, " · " + num(r.units) + " units")),
      h("td", {}, r.regions || "–"),
      h("td", { class: "num" }, credits(r.price_per_hour)),
      h("td", { class: "num" }, credits(r.cost_so_far)),
      h("td", { class: "num muted" }, ago(r.created_at)))));
    setText("count", shown.length + " of " + rows.length + " clusters");
    $("empty").hidden = rows.length > 0;
  }

  function syncStates() {
    const current = sel.value;
    const states = [...new Set(rows.map((r) => r.state))].sort();
    sel.replaceChildren(h("option", { value: "" }, "all states"), ...states.map((s) => h("option", { value: s }, s)));
    sel.value = states.includes(current) ? current : "";
  }

  q.addEventListener("input", render);
  sel.addEventListener("change", render);
  L.poll(async () => { rows = await api("/clusters"); syncStates(); render(); }, 5000);
})();
