"""The admin endpoint's ``/`` page: one self-contained document that polls ``/pool`` (and
``/readyz``, to say why the proxy is not ready).

No external resources (it must work on an isolated host) and no framework. Calls per second
are the difference of ``calls_total`` between two polls. Several workers' rows for one backend
are merged: counts add up, and the state shown is the worst, with how many workers see it.
Everything from the server is put in the page as text nodes, never as HTML: addresses, keys and
metadata come from etcd.
"""

from __future__ import annotations

from typing import Final

PAGE: Final = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>grpc-etcd-proxy</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
h2 { font-size: 1.05em; margin: 1.5em 0 .3em; }
.meta, .sub { color: #666; }
.error { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; background: #fff; table-layout: fixed; width: 64em; }
th { width: 6em; }
th:nth-child(1) { width: 17em; }
th:nth-child(2) { width: 10em; }
th:nth-child(6) { width: 11em; }
th:nth-child(7) { width: 8em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f0f0f0; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { display: inline-block; padding: 0 .5em; border-radius: .7em; color: #fff; }
.state-healthy { background: #2e7d32; }
.state-backoff { background: #f9a825; color: #222; }
.state-unhealthy { background: #ef6c00; }
.state-ejected { background: #c62828; }
.empty { color: #666; font-style: italic; }
</style>
</head>
<body>
<h1>grpc-etcd-proxy</h1>
<div class="meta">workers: <span id="workers">?</span> &middot;
ready: <span id="ready">?</span> &middot; last updated: <span id="updated">never</span></div>
<div id="reason" class="sub"></div>
<div id="error" class="error"></div>
<div id="targets"></div>
<script>
"use strict";
const SEVERITY = ["healthy", "backoff", "unhealthy", "ejected"];
const previous = new Map();  // "target|address" -> {total, at}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function merge(doc) {
  const targets = new Map();
  for (const worker of doc.workers) {
    for (const t of worker.targets) {
      let agg = targets.get(t.target);
      if (!agg) {
        agg = {name: t.target, services: new Set(), watches: [], endpoints: new Map()};
        targets.set(t.target, agg);
      }
      t.services.forEach(s => agg.services.add(s));
      if (t.watch) agg.watches.push(t.watch);
      for (const e of t.endpoints) {
        let row = agg.endpoints.get(e.address);
        if (!row) {
          row = {address: e.address, key: e.key, states: [], health: [], in_flight: 0,
                 calls_total: 0, ejected_until: null, times_ejected: 0};
          agg.endpoints.set(e.address, row);
        }
        row.states.push(e.state);
        row.health.push(e.health);
        row.in_flight += e.in_flight;
        row.calls_total += e.calls_total;
        row.times_ejected += e.times_ejected;
        if (e.ejected_until !== null && (row.ejected_until === null ||
            e.ejected_until > row.ejected_until)) row.ejected_until = e.ejected_until;
      }
    }
  }
  return targets;
}

function worst(values, order) {
  let pick = values[0];
  for (const v of values) if (order.indexOf(v) > order.indexOf(pick)) pick = v;
  const n = values.filter(v => v === pick).length;
  return n === values.length ? pick : pick + " (" + n + "/" + values.length + ")";
}

function watchText(watches) {
  if (!watches.length) return "static";
  const states = [...new Set(watches.map(w => w.state))].join(", ");
  const revision = Math.max(...watches.map(w => w.revision));
  return "etcd watch " + states + ", revision " + revision;
}

function render(doc, readiness) {
  const now = Date.now() / 1000;
  document.getElementById("workers").textContent = doc.workers.length;
  const ready = doc.workers.every(w => w.ready);
  const draining = doc.workers.some(w => w.draining);
  document.getElementById("ready").textContent =
    (ready ? "yes" : "no") + (draining ? " (draining)" : "");
  const errors = doc.workers.filter(w => w.error).map(w => "worker " + w.worker + ": " + w.error);
  document.getElementById("reason").textContent =
    [ready ? "" : readiness, ...errors].filter(Boolean).join("; ");
  const box = document.getElementById("targets");
  const sections = [];
  for (const target of merge(doc).values()) {
    const section = el("section");
    section.dataset.target = target.name;
    section.append(el("h2", "target " + target.name));
    section.append(el("div", "services: " + [...target.services].join(", ") + " \\u00b7 " +
                             watchText(target.watches), "sub"));
    const table = el("table");
    const head = el("tr");
    for (const h of ["endpoint", "state", "in flight", "calls/s", "calls total",
                     "ejected until", "health"]) head.append(el("th", h));
    table.appendChild(el("thead")).append(head);
    const body = table.appendChild(el("tbody"));
    if (!target.endpoints.size) {
      const tr = el("tr");
      const td = el("td", "no endpoints", "empty");
      td.colSpan = 7;
      tr.append(td);
      body.append(tr);
    }
    for (const e of target.endpoints.values()) {
      const id = target.name + "|" + e.address;
      const before = previous.get(id);
      let rate = "\\u2013";
      if (before && now > before.at && e.calls_total >= before.total) {
        rate = ((e.calls_total - before.total) / (now - before.at)).toFixed(1);
      }
      previous.set(id, {total: e.calls_total, at: now});
      const state = worst(e.states, SEVERITY);
      const tr = el("tr");
      tr.className = "endpoint";
      tr.dataset.address = e.address;
      tr.dataset.state = state.split(" ")[0];
      const addr = el("td", e.address);
      if (e.key) addr.title = e.key;
      tr.append(addr);
      const stateCell = el("td");
      stateCell.append(el("span", state, "state state-" + tr.dataset.state));
      tr.append(stateCell);
      tr.append(el("td", e.in_flight, "num"));
      tr.append(el("td", rate, "num"));
      tr.append(el("td", e.calls_total, "num"));
      tr.append(el("td", e.ejected_until === null ? "" :
        new Date(e.ejected_until * 1000).toLocaleTimeString() +
        " (" + e.times_ejected + "\\u00d7)"));
      tr.append(el("td", worst(e.health, ["off", "serving", "unknown", "not_serving"])));
      body.append(tr);
    }
    section.append(table);
    sections.push(section);
  }
  box.replaceChildren(...sections);
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
}

async function poll() {
  try {
    const [pool, ready] = await Promise.all(
      [fetch("pool", {cache: "no-store"}), fetch("readyz", {cache: "no-store"})]);
    if (!pool.ok) throw new Error("HTTP " + pool.status);
    render(await pool.json(), (await ready.text()).trim());
    document.getElementById("error").textContent = "";
  } catch (err) {
    document.getElementById("error").textContent = "cannot load /pool: " + err.message;
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""
