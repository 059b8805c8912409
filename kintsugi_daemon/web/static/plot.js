// A small line plot on a canvas: no library, no CDN (the page must work with no internet).
"use strict";

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) { ticks.push(t); }
  return ticks;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(1); }
  return String(+v.toPrecision(3));
}

// series: [{name, color, points: [[x, y], ...]}]. Sets canvas.dataset.points to the points drawn.
function drawPlot(canvas, series, opts) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  const m = { l: 52, r: 12, t: 22, b: 34 };
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  canvas.dataset.points = String(all.length);
  ctx.fillStyle = "#9aa0a6";
  if (all.length === 0) {
    ctx.fillText(opts.empty || "no data yet", m.l + 10, H / 2);
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (opts.yMin !== undefined) { y0 = Math.min(y0, opts.yMin); }
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; y0 -= (Math.abs(y0) || 1) * 0.1; }
  const X = (x) => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
  const Y = (y) => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
  ctx.strokeStyle = "#2b3138";
  ctx.lineWidth = 1;
  for (const t of niceTicks(y0, y1, 4)) {
    ctx.beginPath(); ctx.moveTo(m.l, Y(t)); ctx.lineTo(W - m.r, Y(t)); ctx.stroke();
    ctx.fillText(fmt(t), 4, Y(t) + 4);
  }
  for (const t of niceTicks(x0, x1, 6)) {
    ctx.fillText(fmt(t), X(t) - 8, H - m.b + 14);
  }
  ctx.fillText(opts.xLabel || "", W / 2 - 30, H - 4);
  let lx = m.l + 6;
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.6;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    for (const p of pts) { ctx.fillRect(X(p[0]) - 1.5, Y(p[1]) - 1.5, 3, 3); }
    if (pts.length) {
      ctx.fillRect(lx, 7, 10, 3);
      ctx.fillText(s.name, lx + 13, 12);
      lx += ctx.measureText(s.name).width + 28;
    }
  }
}

window.drawPlot = drawPlot;
