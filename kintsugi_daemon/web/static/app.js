// The live page: one EventSource on /api/stream (snapshot, then deltas), rendered into the DOM.
"use strict";

const S = { instruments: {}, current: null, broker: {}, operator: null, pinned: null, pinnedRun: null };
const $ = (id) => document.getElementById(id);
const FRACTIONS = [
  ["fraction_pore", "Pt-filled pore", "#ebb928"], ["fraction_unfilled_pore", "unfilled pore", "#dc1e3c"],
  ["fraction_active", "NMC", "#3c6ed2"], ["fraction_cbd", "CBD", "#3cb45a"], ["porosity", "porosity", "#e8e6e3"],
];
const DECISION_COLOURS = ["#ebb928", "#3c6ed2", "#3cb45a", "#dc1e3c", "#b07cd8"];

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function duration(s) {
  if (typeof s !== "number") { return "-"; }
  if (s < 90) { return `${Math.round(s)} s`; }
  if (s < 5400) { return `${(s / 60).toFixed(1)} min`; }
  return `${(s / 3600).toFixed(1)} h`;
}

function upsertSlice(view, row) {
  const i = view.slices.findIndex((r) => r.slice === row.slice);
  if (i >= 0) { view.slices[i] = row; } else { view.slices.push(row); view.slices.sort((a, b) => a.slice - b.slice); }
}

function apply(u) {
  if (u.kind === "snapshot") {
    S.instruments = u.instruments; S.broker = u.broker;
  } else if (u.kind === "broker") {
    S.broker = { connected: u.connected, error: u.error };
  } else if (u.kind === "instrument") {
    S.instruments[u.id] = u.view;
  } else {
    const v = S.instruments[u.id];
    if (!v) { return; }
    if (u.kind === "patch") { v[u.field] = u.value; }
    else if (u.kind === "alert") { if (u.value) { v.alerts[u.alert_id] = u.value; } else { delete v.alerts[u.alert_id]; } }
    else if (u.kind === "event") { v.events.push(u.value); if (v.events.length > 200) { v.events.shift(); } }
    else if (u.kind === "slice") { upsertSlice(v, u.value); }
  }
  if (!S.current || !S.instruments[S.current]) { S.current = Object.keys(S.instruments).sort()[0] || null; }
  render();
}

function renderNav() {
  const nav = $("instruments");
  const ids = Object.keys(S.instruments).sort();
  nav.innerHTML = ids.map((id) => {
    const v = S.instruments[id];
    const online = v.status && v.status.state === "online";
    const alert = Object.keys(v.alerts || {}).length > 0;
    return `<button data-id="${esc(id)}" class="${id === S.current ? "active" : ""}">` +
      `<span class="dot ${alert ? "alert" : online ? "online" : ""}"></span>${esc(id)}</button>`;
  }).join("");
  const b = $("broker");
  b.textContent = S.broker.connected ? "broker connected" : `broker: ${S.broker.error || "connecting"}`;
  b.className = "pill " + (S.broker.connected ? "ok" : "bad");
}

function depthOf(view, row, first) {
  if (typeof row.z_m === "number" && typeof first.z_m === "number") { return (row.z_m - first.z_m) * 1e6; }
  const t = row.thickness_m || (view.latest && view.latest.thickness_m) || 40e-9;
  return row.slice * t * 1e6;
}

function renderPlots(view) {
  const rows = view.slices;
  const first = rows[0] || {};
  const xs = rows.map((r) => depthOf(view, r, first));
  const fractions = FRACTIONS.map(([key, name, color]) => ({
    name, color, points: rows.map((r, i) => [xs[i], r.metrics ? r.metrics[key] : undefined]).filter((p) => p[1] !== undefined),
  }));
  drawPlot($("plot-fractions"), fractions, { xLabel: "depth (µm)", yMin: 0, empty: "no segmented slice yet" });
  const keys = new Set();
  rows.forEach((r) => Object.entries(r.decisions || {}).forEach(([k, v]) => { if (typeof v === "number") { keys.add(k); } }));
  const decisions = [...keys].sort().map((k, i) => ({
    name: k, color: DECISION_COLOURS[i % DECISION_COLOURS.length],
    points: rows.map((r, j) => [xs[j], (r.decisions || {})[k]]).filter((p) => typeof p[1] === "number"),
  }));
  // Slice thickness is the decision every policy takes; from the face positions when nothing else says it.
  const thickness = rows.slice(1).map((r, i) => [xs[i + 1], (xs[i + 1] - xs[i]) * 1000]).filter((p) => p[1] > 0);
  decisions.unshift({ name: "slice thickness (nm)", color: "#e8e6e3", points: thickness });
  drawPlot($("plot-decisions"), decisions, { xLabel: "depth (µm)", empty: "no adaptive decision yet" });
}

function renderOverlay(view) {
  const withOverlay = view.slices.filter((r) => r.overlay);
  const slider = $("slider");
  const img = $("overlay");
  if (S.pinnedRun !== view.run_id) { S.pinned = null; S.pinnedRun = view.run_id; }
  img.hidden = withOverlay.length === 0;
  if (withOverlay.length === 0) {
    slider.max = 0; img.removeAttribute("src"); delete img.dataset.slice;
    $("overlay-slice").textContent = "-"; $("overlay-follow").textContent = "(no overlay yet)";
    return;
  }
  const last = withOverlay[withOverlay.length - 1].slice;
  slider.min = withOverlay[0].slice; slider.max = last;
  const chosen = S.pinned === null ? last : S.pinned;
  const row = withOverlay.reduce((best, r) => (Math.abs(r.slice - chosen) < Math.abs(best.slice - chosen) ? r : best));
  slider.value = row.slice;
  $("overlay-slice").textContent = `${row.slice + 1} of ${view.slices.length}`;
  $("overlay-follow").textContent = S.pinned === null ? "(following the latest)" : "(pinned; slide to the end to follow)";
  const src = `/api/instruments/${encodeURIComponent(view.id)}/slices/${row.slice}/overlay.png?run=${encodeURIComponent(view.run_id || "")}`;
  if (img.getAttribute("src") !== src) { img.setAttribute("src", src); img.dataset.slice = String(row.slice); }
}

function renderEvents(view) {
  const rows = view.events.slice(-60).reverse().map((e) => {
    const t = (e.time || "").slice(11, 19);
    return `<tr><td>${esc(e.seq)}</td><td>${esc(t)}</td><td>${esc(String(e.type || "").replace("kintsugi.", ""))}</td>` +
      `<td class="data">${esc(JSON.stringify(e.data || {}).slice(0, 160))}</td></tr>`;
  });
  $("events").tBodies[0].innerHTML = rows.join("");
}

function render() {
  renderNav();
  const view = S.instruments[S.current];
  $("empty").hidden = !!view;
  $("instrument").hidden = !view;
  if (!view) { return; }
  const st = view.status || {};
  const p = view.progress || {};
  $("state").textContent = st.state === "online" ? (st.path || "?") : (st.state || "?");
  $("reason").textContent = st.reason ? `reason: ${st.reason}` : "";
  const done = typeof p.slice === "number" ? p.slice : view.slices.length;
  $("slice-n").textContent = p.run_id ? String(done) : "-";
  $("slice-total").textContent = p.total ?? "-";
  $("percent-bar").style.width = `${p.percent || 0}%`;
  $("step").textContent = p.step ? `step ${p.step}` : "";
  $("eta").textContent = p.run_id ? duration(p.eta_s) : "-";
  $("run-id").textContent = p.run_id ? `run ${p.run_id}` : "no run";
  const alerts = Object.values(view.alerts || {});
  $("alerts").innerHTML = alerts.map((a) =>
    `<li class="${esc(a.severity)}" data-alert="${esc(a.id)}"><b>${esc(a.id)}</b> [${esc(a.severity)}] ${esc(a.message)}</li>`).join("");
  document.querySelectorAll("#commands button").forEach((b) => { b.disabled = !S.operator; });
  renderOverlay(view);
  renderPlots(view);
  renderEvents(view);
}

function connect() {
  const source = new EventSource("/api/stream");
  source.onmessage = (m) => apply(JSON.parse(m.data));
  source.onerror = () => { S.broker = { connected: false, error: "page server unreachable; retrying" }; renderNav(); };
}

async function refreshSession() {
  const r = await fetch("/api/session");
  const body = await r.json();
  S.operator = body.operator;
  $("who").textContent = S.operator ? `operator: ${S.operator}` : "read-only";
  $("logout-button").hidden = !S.operator;
  for (const id of ["username", "password", "login-button"]) { $(id).hidden = !!S.operator; }
  render();
}

function confirmDialog(text) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.onclose = () => resolve(dialog.returnValue === "ok");
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function sendCommand(verb, now) {
  const id = S.current;
  if (!(await confirmDialog(`Send ${verb}${now ? " now" : ""} to ${id}?`))) { return; }
  const r = await fetch(`/api/instruments/${encodeURIComponent(id)}/cmd/${verb}`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ confirm: true, ...(now ? { now: true } : {}) }),
  });
  const body = await r.json();
  $("command-result").textContent = r.ok
    ? `${verb}: ${body.accepted ? "accepted" : "refused: " + body.error} (state ${body.state})`
    : `${verb}: ${body.detail}`;
}

$("instruments").addEventListener("click", (e) => {
  const b = e.target.closest("button");
  if (b) { S.current = b.dataset.id; S.pinned = null; render(); }
});
$("slider").addEventListener("input", (e) => {
  const v = +e.target.value;
  S.pinned = v >= +e.target.max ? null : v;
  render();
});
$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await fetch("/api/login", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: $("username").value, password: $("password").value }),
  });
  if (!r.ok) { $("who").textContent = (await r.json()).detail; return; }
  $("password").value = "";
  refreshSession();
});
$("logout-button").addEventListener("click", async () => { await fetch("/api/logout", { method: "POST" }); refreshSession(); });
$("commands").addEventListener("click", (e) => {
  const b = e.target.closest("button");
  if (b && !b.disabled) { sendCommand(b.dataset.verb, !!b.dataset.now); }
});

connect();
refreshSession();
