/* One cluster, in aggregate: members, state timeline, cost so far. */
"use strict";
(() => {
  const { api, $, h, setText, badge, num, credits, ago, dur, timeline } = L;
  const id = L.lastSegment();
  setText("crumb", id);

  L.poll(async () => {
    const c = await api("/clusters/" + encodeURIComponent(id));
    setText("title", "Cluster " + c.id);
    $("k-state").replaceChildren(badge(c.state));
    setText("k-state-note", c.ended_at ? "ended " + ago(c.ended_at) : c.ready_at ? "ready " + ago(c.ready_at) : "created " + ago(c.created_at));
    setText("k-members", num(c.members_ready) + " ready");
    setText("k-members-note", num(c.nodes) + " nodes live · " + num(c.members_total) + " members ever");
    setText("k-price", credits(c.price_per_hour));
    setText("k-price-note", c.models + " · " + num(c.units) + " units");
    setText("k-cost", credits(c.cost_so_far));
    const ran = c.ready_at ? ((c.ended_at || Date.now() / 1000) - c.ready_at) : null;
    setText("k-cost-note", (ran !== null ? "price × " + dur(ran) + " · " : "not started · ") + credits(c.settled) + " settled");
    $("members").querySelector("tbody").replaceChildren(...c.members.map((m) => h("tr", { "data-state": m.state },
      h("td", {}, m.role),
      h("td", {}, h("a", { href: "/nodes/" + encodeURIComponent(m.node_id), class: "mono" }, m.node_id.slice(0, 12))),
      h("td", {}, badge(m.state)),
      h("td", {}, m.model, h("span", { class: "muted small" }, " × " + m.units)),
      h("td", {}, m.region || "–"),
      h("td", { class: "num" }, credits(m.price)))));
    timeline($("timeline"), [...c.events].reverse(), false);
  }, 5000);
})();
