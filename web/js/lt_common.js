// Shared helpers of the Lumina Turbo web extension: callback chaining and a small SVG line chart.
// ComfyUI loads every .js under web/ as a module; this one only exports and registers nothing.

const SVG_NS = "http://www.w3.org/2000/svg";

/** Wrap `object[name]` so the existing callback runs first and `extra` after it, with the same
 * `this` and arguments. The original's return value is kept. */
export function chainCallback(object, name, extra) {
  const original = object[name];
  object[name] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}

function svgElement(tag, attributes = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
  return el;
}

/** A chart block for a DOM widget: an SVG drawing area and a caption line under it. */
export function createChartElement(className) {
  const root = document.createElement("div");
  root.className = className;
  Object.assign(root.style, {
    display: "flex",
    flexDirection: "column",
    width: "100%",
    height: "100%",
    boxSizing: "border-box",
    padding: "2px 4px",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "6px",
    overflow: "hidden",
  });
  const svg = svgElement("svg", { viewBox: "0 0 320 150" });
  Object.assign(svg.style, { flex: "1 1 0", minHeight: "60px", width: "100%" });
  // Drawn in the element's own pixels (text stays undistorted at any node width); redrawn on resize.
  new ResizeObserver(() => {
    if (svg.ltChart) drawLineChart(svg, svg.ltChart);
  }).observe(svg);
  const caption = document.createElement("div");
  Object.assign(caption.style, {
    font: "11px sans-serif",
    color: "var(--descrip-text, #999)",
    lineHeight: "14px",
    maxHeight: "28px", // two lines; the full text is in the tooltip
    overflow: "hidden",
    padding: "2px 2px 0",
    flex: "none",
  });
  root.append(svg, caption);
  return { root, svg, caption };
}

function formatTick(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1000 || abs < 0.01) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

/**
 * Draw line series into `svg`, sized to the element (320x150 until it is laid out).
 * series: [{points: [[x, y], ...], color, dots, width, name}]; x/y ranges: [min, max].
 */
export function drawLineChart(svg, chart) {
  const { series, xRange, yRange, xLabel = "", yLabel = "" } = chart;
  svg.ltChart = chart;
  svg.replaceChildren();
  const W = Math.max(120, Math.round(svg.clientWidth) || 320);
  const H = Math.max(60, Math.round(svg.clientHeight) || 150);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pad = { left: 34, right: 8, top: 8, bottom: 20 };
  const [x0, x1] = xRange[1] > xRange[0] ? xRange : [xRange[0], xRange[0] + 1];
  const [y0, y1] = yRange[1] > yRange[0] ? yRange : [yRange[0] - 0.5, yRange[0] + 0.5];
  const px = (x) => pad.left + ((x - x0) / (x1 - x0)) * (W - pad.left - pad.right);
  const py = (y) => H - pad.bottom - ((y - y0) / (y1 - y0)) * (H - pad.top - pad.bottom);
  const muted = "var(--descrip-text, #888)";
  const grid = "var(--border-color, #444)";

  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(svgElement("line", { x1: px(x0), x2: px(x1), y1: py(y), y2: py(y), stroke: grid, "stroke-width": 0.5 }));
    const label = svgElement("text", { x: pad.left - 3, y: py(y) + 3, "text-anchor": "end", "font-size": 9, fill: muted });
    label.textContent = formatTick(y);
    svg.append(label);
  }
  for (const x of [x0, x1]) {
    const label = svgElement("text", { x: px(x), y: H - 8, "text-anchor": "middle", "font-size": 9, fill: muted });
    label.textContent = formatTick(x);
    svg.append(label);
  }
  if (xLabel) {
    const label = svgElement("text", { x: (px(x0) + px(x1)) / 2, y: H - 8, "text-anchor": "middle", "font-size": 9, fill: muted });
    label.textContent = xLabel;
    svg.append(label);
  }
  if (yLabel) {
    const label = svgElement("text", { x: pad.left + 8, y: pad.top + 14, "font-size": 10, fill: muted });
    label.textContent = yLabel;
    svg.append(label);
  }
  for (const { points, color, dots = false, width = 1.5, name = "" } of series) {
    if (!points.length) continue;
    const path = svgElement("polyline", {
      points: points.map(([x, y]) => `${px(x).toFixed(2)},${py(y).toFixed(2)}`).join(" "),
      fill: "none",
      stroke: color,
      "stroke-width": width,
      "stroke-linejoin": "round",
      "data-series": name,
    });
    svg.append(path);
    if (dots) {
      for (const [x, y] of points) {
        svg.append(svgElement("circle", { cx: px(x).toFixed(2), cy: py(y).toFixed(2), r: 2.2, fill: color }));
      }
    }
  }
}
