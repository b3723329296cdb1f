/* Loom explorer: shared helpers (fetching, formatting, DOM, tables, SVG charts). No
   dependencies; text from the network is only ever set as text, never parsed as HTML. */
"use strict";

const L = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  // The server rendered the first view and embedded its data: the first tick uses it.
  let initial = null;
  const initialEl = document.getElementById("initial-data");
  if (initialEl) { try { initial = { path: initialEl.dataset.path, data: JSON.parse(initialEl.textContent) }; } catch (_) { initial = null; } }

  async function api(path) {
    if (initial && path === initial.path) { const data = initial.data; initial = null; return data; }
    const r = await fetch("/explorer/api" + path, { cache: "no-store", headers: { accept: "application/json" } });
    if (!r.ok) {
      let message = "HTTP " + r.status;
      try { const body = await r.json(); message = (body.error && body.error.message) || message; } catch (_) { /* not JSON */ }
      const err = new Error(message); err.status = r.status; throw err;
    }
    return r.json();
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v; else if (k === "text") el.textContent = v; else el.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function s(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return el;
  }

  const $ = (id) => document.getElementById(id);
  function setText(id, value) { const el = $(id); if (el) el.textContent = value; }

  // --- formatting
  function pct(r) { return r === null || r === undefined ? "–" : (r * 100).toFixed(r > 0 && r < 0.1 ? 1 : 0) + "%"; }
  function num(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }
  function credits(text) {
    if (text === null || text === undefined || text === "") return "–";
    const n = Number(text);
    return n.toLocaleString("en-US", { maximumFractionDigits: Math.abs(n) < 1 ? 6 : 2 });
  }
  function ago(ts) {
    if (!ts) return "never";
    const d = Math.max(0, Date.now() / 1000 - ts);
    if (d < 60) return Math.round(d) + " s ago";
    if (d < 3600) return Math.round(d / 60) + " min ago";
    if (d < 86400) return (d / 3600).toFixed(1) + " h ago";
    return Math.round(d / 86400) + " d ago";
  }
  function dur(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const d = Math.max(0, seconds);
    if (d < 1) return Math.round(d * 1000) + " ms";
    if (d < 60) return d.toFixed(d < 10 ? 1 : 0) + " s";
    if (d < 3600) return Math.floor(d / 60) + " min " + Math.round(d % 60) + " s";
    if (d < 86400) return Math.floor(d / 3600) + " h " + Math.round((d % 3600) / 60) + " min";
    return Math.floor(d / 86400) + " d " + Math.round((d % 86400) / 3600) + " h";
  }
  function when(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  function rate(x) {
    if (x === null || x === undefined) return "–";
    const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [v, u] of units) if (Math.abs(x) >= v) return (x / v).toFixed(2) + " " + u;
    return Number(x).toFixed(2);
  }

  const TONE = {
    available: "ok", verified: "ok", running: "ok", ready: "ok", passed: "ok",
    allocated: "info", provisioning: "info", starting: "info", assigned: "info", requested: "info",
    verifying: "warn", claimed: "warn", healing: "warn", terminating: "warn", registering: "warn", interrupted: "warn",
    offline: "bad", failed: "bad", banned: "bad", lost: "bad", error: "bad",
  };
  function tone(state) { return TONE[String(state).replace(/^node /, "")] || ""; }
  function badge(state) { return h("span", { class: "badge " + tone(state) }, state); }

  // --- page state
  function live(ok, note) {
    const el = $("live"); if (!el) return;
    el.className = "live " + (ok ? "on" : "off");
    el.textContent = ok ? "live" : "offline";
    el.title = note || "";
    const err = $("error");
    if (err) { err.hidden = ok; if (!ok) err.textContent = "Cannot reach the coordinator: " + (note || "no answer") + ". Retrying…"; }
  }
  function stamp() { setText("updated", "Updated " + new Date().toLocaleTimeString()); }

  /** Run `step` now and every `ms` (paused while the tab is hidden). */
  function poll(step, ms) {
    let timer = null;
    async function run() {
      clearTimeout(timer);
      try { await step(); live(true); stamp(); } catch (e) {
        if (e && e.status === 404) { notFound(e.message); return; }
        live(false, e && e.message);
      }
      if (!document.hidden) timer = setTimeout(run, ms);
    }
    document.addEventListener("visibilitychange", () => { if (!document.hidden) run(); });
    run();
  }
  function notFound(message) {
    const main = $("main");
    main.replaceChildren(h("section", { class: "card" }, h("h1", {}, "Not found"), h("p", { class: "sub" }, message), h("p", {}, h("a", { href: "/" }, "Back to the network"))));
    live(true);
  }
  function lastSegment() { return decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || ""); }

  // --- lists
  function chips(el, counts) {
    const entries = Object.entries(counts || {}).filter(([, n]) => n > 0);
    el.replaceChildren(...(entries.length ? entries.map(([k, n]) => h("span", { class: "chip" }, h("span", { class: "badge " + tone(k) }, k), h("b", {}, num(n)))) : [h("span", { class: "chip none" }, "none")]));
  }

  /** Horizontal stacked bars: rows [{name, href?, parts: [[count, cls]]}]. */
  function bars(el, rows) {
    if (!rows.length) { el.replaceChildren(h("p", { class: "empty" }, "No devices yet.")); return; }
    const max = Math.max(1, ...rows.map((r) => r.parts.reduce((a, [n]) => a + n, 0)));
    el.replaceChildren(h("div", { class: "bars" }, rows.map((r) => {
      const total = r.parts.reduce((a, [n]) => a + n, 0);
      const track = h("div", { class: "track", title: r.parts.map(([n, , label]) => label + ": " + n).join(", ") },
        r.parts.filter(([n]) => n > 0).map(([n, cls]) => { const i = h("i", { class: cls }); i.style.width = (100 * n / max) + "%"; return i; }));
      return h("div", { class: "barrow" }, h("span", { class: "name", title: r.name }, r.name), track, h("span", { class: "n" }, num(total)));
    })));
  }

  function timeline(el, events, reasons) {
    if (!events.length) { el.replaceChildren(h("li", {}, h("span", { class: "why" }, "No transitions yet."))); return; }
    el.replaceChildren(...events.map((e) => h("li", { class: tone(e.to) },
      h("div", {}, badge(e.to), " ", h("span", { class: "when" }, (e.from ? "from " + e.from + " · " : "") + when(e.at) + " (" + ago(e.at) + ")")),
      reasons && e.reason ? h("div", { class: "why" }, e.reason) : null)));
  }

  /** A table whose header cells (th[data-key]) sort its rows; `render(rows)` fills the body. */
  function sortable(table, initialKey, initialDir, onChange) {
    const state = { key: initialKey, dir: initialDir };
    const ths = [...table.querySelectorAll("th[data-key]")];
    function mark() { ths.forEach((th) => th.classList.toggle("asc", th.dataset.key === state.key && state.dir > 0)); ths.forEach((th) => th.classList.toggle("desc", th.dataset.key === state.key && state.dir < 0)); }
    ths.forEach((th) => th.addEventListener("click", () => {
      state.dir = state.key === th.dataset.key ? -state.dir : 1; state.key = th.dataset.key; mark(); onChange();
    }));
    mark();
    return function sort(rows) {
      const k = state.key, d = state.dir;
      return [...rows].sort((a, b) => {
        let x = a[k], y = b[k];
        if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
        const nx = Number(x), ny = Number(y);
        if (!Number.isNaN(nx) && !Number.isNaN(ny) && x !== "" && y !== "") return d * (nx - ny);
        return d * String(x).localeCompare(String(y));
      });
    };
  }

  // --- SVG charts
  /** Line chart of ratios over [t0, t1]: series [{points: [[t, v|null]], cls, area}]. */
  function chart(el, series, t0, t1) {
    const W = Math.max(300, el.clientWidth || 600), H = Math.max(120, el.clientHeight || 220);
    const m = { l: 40, r: 10, t: 10, b: 24 }, w = W - m.l - m.r, hh = H - m.t - m.b;
    const x = (t) => m.l + w * (t - t0) / Math.max(1, t1 - t0), y = (v) => m.t + hh * (1 - v);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
    const grid = s("g", { class: "grid" }), axis = s("g", { class: "axis" });
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      grid.append(s("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
      const t = s("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }); t.textContent = (v * 100) + "%"; axis.append(t);
    }
    const span = t1 - t0, step = span > 12 * 3600 ? 4 * 3600 : span > 3 * 3600 ? 3600 : span > 3600 ? 900 : 300;
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      const lab = s("text", { x: x(t), y: H - 6, "text-anchor": "middle" });
      lab.textContent = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); axis.append(lab);
    }
    svg.append(grid, axis);
    let any = false;
    const gap = 5 * 60;
    for (const ser of series) {
      const pts = ser.points.filter(([t, v]) => v !== null && v !== undefined && t >= t0);
      if (!pts.length) continue;
      any = true;
      let d = "", prev = null;
      for (const [t, v] of pts) { d += (prev === null || t - prev > gap ? "M" : "L") + x(t).toFixed(1) + " " + y(v).toFixed(1); prev = t; }
      if (ser.area && pts.length > 1) {
        const a = "M" + x(pts[0][0]).toFixed(1) + " " + y(0) + d.replace(/^M/, "L") + "L" + x(pts[pts.length - 1][0]).toFixed(1) + " " + y(0) + "Z";
        svg.append(s("path", { d: a, class: ser.area }));
      }
      svg.append(s("path", { d, class: ser.cls }));
      const [lt, lv] = pts[pts.length - 1];
      svg.append(s("circle", { cx: x(lt), cy: y(lv), r: 3.5, class: ser.dot }));
    }
    if (!any) { const t = s("text", { x: m.l + w / 2, y: m.t + hh / 2, "text-anchor": "middle", class: "nodata" }); t.textContent = "No samples yet: the coordinator records one a minute."; svg.append(t); }
    el.replaceChildren(svg);
  }

  function spark(svg, values) {
    const W = 120, H = 24;
    if (values.length < 2) { svg.replaceChildren(); return; }
    const max = Math.max(1e-9, ...values), n = values.length;
    const d = values.map((v, i) => (i ? "L" : "M") + (W * i / (n - 1)).toFixed(1) + " " + (H - 2 - (H - 4) * v / max).toFixed(1)).join("");
    svg.replaceChildren(s("path", { d }));
  }

  return { api, h, $, setText, pct, num, credits, ago, dur, when, rate, tone, badge, live, poll, chips, bars, timeline, sortable, chart, spark, lastSegment };
})();
