/* The ledger: totals, latest transactions, and the hash chain re-verified by the server. */
"use strict";
(() => {
  const { api, $, h, num, credits, ago, when, chips } = L;
  let verifiedAt = -1;
  const LABELS = [
    ["minted", "Minted", "credit ever deposited"], ["user_balances", "User balances", "spendable"],
    ["escrow", "In escrow", "held for running clusters"], ["earned_by_suppliers", "Earned by suppliers", "settled, net of fees"],
    ["earnings_unpaid", "Earnings unpaid", "not withdrawn yet"], ["fees", "Platform fees", ""], ["paid_out", "Paid out", "left Loom"],
  ];

  function short(account) {
    const [kind, rest] = account.split(":");
    return rest && rest.length > 14 ? kind + ":" + rest.slice(0, 10) + "…" : account;
  }

  async function verify(seq) {
    if (seq === verifiedAt) return;
    const el = $("verify");
    let v;
    try { v = await api("/ledger/verify"); } catch (e) {
      if (e.status === 404) { el.className = "banner"; el.replaceChildren(h("b", {}, "Verification not available"), "this coordinator has no ledger verification."); verifiedAt = seq; return; }
      throw e;
    }
    verifiedAt = seq;
    el.className = "banner " + (v.ok ? "ok" : "bad");
    el.dataset.ok = String(v.ok);
    el.replaceChildren(
      h("b", {}, v.ok ? "Hash chain verified" : "Verification FAILED"),
      v.ok ? num(v.count) + " transactions re-hashed and re-balanced; every balance agrees; all balances sum to " + v.total + ". Head " : v.failure + " ",
      v.ok ? h("span", { class: "hash", title: v.head_hash }, "#" + v.last_seq + " " + v.head_hash.slice(0, 16) + "…") : null);
  }

  L.poll(async () => {
    const s = await api("/ledger");
    $("totals").replaceChildren(...LABELS.map(([k, label, note]) => h("div", { class: "kpi" },
      h("span", { class: "label" }, label), h("b", {}, credits(s.totals[k])), h("span", { class: "note" }, note))));
    chips($("kinds"), s.by_kind);
    $("empty").hidden = s.latest.length > 0;
    $("txns").querySelector("tbody").replaceChildren(...s.latest.map((t) => h("tr", { "data-seq": t.seq },
      h("td", { class: "num" }, num(t.seq)),
      h("td", { title: when(t.at), class: "nowrap" }, ago(t.at)),
      h("td", {}, h("span", { class: "badge" }, t.kind)),
      h("td", { class: "num" }, credits(t.amount)),
      h("td", {}, h("div", { class: "entries" }, t.entries.map((e) => h("span", { class: Number(e.amount) > 0 ? "pos" : "neg", title: e.account }, (Number(e.amount) > 0 ? "+" : "") + credits(e.amount) + " " + short(e.account))))),
      h("td", {}, h("span", { class: "hash", title: t.hash }, t.hash.slice(0, 12) + "…")))));
    await verify(s.head_seq);
  }, 5000);
})();
