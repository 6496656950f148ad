// A small SVG line chart, enough for training curves: lineChart(title, series) -> <svg>.
// series: [{name, points: [[x, y], ...]}]; one colour per series, a legend when there are several.
"use strict";
const PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#1b7c83", "#e16f24", "#6e7781"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

function lineChart(title, series, opts) {
  opts = opts || {};
  const W = opts.width || 420, H = opts.height || 230, L = 52, R = 12, T = 24, B = 30;
  const pts = series.flatMap((s) => s.points);
  const svg = svgEl("svg", {class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": title, "data-points": String(pts.length)});
  svg.appendChild(svgEl("text", {class: "title", x: L, y: 15}, title));
  if (!pts.length) {
    svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    if (t < y0 || t > y1) continue;
    svg.appendChild(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t)}));
    svg.appendChild(svgEl("text", {x: L - 4, y: sy(t) + 4, "text-anchor": "end"}, fmtTick(t)));
  }
  for (const t of niceTicks(x0, x1, 5)) {
    if (t < x0 || t > x1) continue;
    svg.appendChild(svgEl("text", {x: sx(t), y: H - B + 14, "text-anchor": "middle"}, fmtTick(t)));
  }
  svg.appendChild(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.appendChild(svgEl("text", {x: W - R, y: H - 4, "text-anchor": "end"}, opts.xLabel || "step"));
  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg.appendChild(svgEl("path", {class: "series", d, fill: "none", stroke: color, "stroke-width": 1.5,
                                   "data-name": s.name, "data-n": String(s.points.length)}));
    if (s.points.length <= 40) {
      for (const p of s.points) svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: color}));
    }
    if (series.length > 1) {
      const y = T + 4 + i * 14;
      svg.appendChild(svgEl("rect", {x: W - R - 150, y: y - 8, width: 9, height: 9, fill: color}));
      svg.appendChild(svgEl("text", {x: W - R - 137, y}, s.name.length > 26 ? "…" + s.name.slice(-25) : s.name));
    }
  });
  return svg;
}
