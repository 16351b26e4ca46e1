// The console's only script: copy buttons, and the live page's refresh (polling).
"use strict";

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  const done = () => { button.textContent = "Copied"; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(source.textContent).then(done, () => select(source, done));
  } else {
    select(source, done);
  }
});

function select(node, done) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  try { document.execCommand("copy"); done(); } catch (_) { /* the text stays selected */ }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function fill(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows.map((values) => {
    const tr = document.createElement("tr");
    values.forEach((v) => cell(tr, v));
    return tr;
  }));
}

async function refresh(root) {
  try {
    const response = await fetch(root.dataset.source, { credentials: "same-origin" });
    if (!response.ok) return;
    const live = await response.json();
    document.getElementById("rps").textContent = live.rps;
    document.getElementById("in-flight").textContent = live.in_flight;
    document.getElementById("streams").textContent = live.active_streams;
    document.getElementById("latency").textContent = `${live.p50_ms} / ${live.p99_ms} ms`;
    document.getElementById("upstream").textContent =
      `${live.upstream_p50_ms} / ${live.upstream_p99_ms} ms`;
    document.getElementById("overhead").textContent =
      `${live.overhead_p50_ms} / ${live.overhead_p99_ms} ms`;
    fill(document.getElementById("errors"), Object.entries(live.errors).map(([k, v]) => [k, v]));
    fill(document.getElementById("members"), live.members.map(
      (m) => [m.member, m.state, m.requests, m.throttles, m.failovers]));
    fill(document.getElementById("recent"), live.recent.map((r) => [
      r.time, r.operation, r.model || "", r.status, r.total_tokens,
      r.cost === null ? "" : r.cost.toFixed(6)]));
    root.dataset.updated = String(Date.now());
  } catch (_) { /* the next tick tries again */ }
}

const live = document.getElementById("live");
if (live) {
  refresh(live);
  setInterval(() => refresh(live), 2000);
}

// A page restored from the back/forward cache is asked for again: after a sign-out the
// server answers with the sign-in page, not the signed-in page as it was.
window.addEventListener("pageshow", (event) => {
  if (event.persisted) window.location.reload();
});
