// Live sigma-curve preview on the pack's schedule nodes. The curve comes from the pack's route
// GET /lumina_turbo/sigmas (nodes/web_routes.py), which calls the same Python schedule functions as
// the nodes, so the math exists once. It redraws whenever a widget value changes (typed, dragged,
// loaded from a workflow, or set by another extension).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chainCallback, createChartElement, drawLineChart } from "./lt_common.js";

const SCHEDULE_NODES = new Set(["LTSigmoidScheduler", "LTAnchorScheduler"]);
const WIDGET_NAME = "sigma_preview";
const CURVE_COLOR = "#4fa3ff";
const DEBOUNCE_MS = 120;

// Nodes that set a flow model's rational time shift (ModelSamplingDiscreteFlow.shift) from a widget.
const RATIONAL_SHIFT_NODES = new Set(["ModelSamplingAuraFlow", "ModelSamplingSD3"]);
const MAX_HOPS = 32;

function widgetValues(node) {
  const values = {};
  for (const widget of node.widgets ?? []) {
    // Skip our own widget and display-only ones such as "control_after_generate".
    if (widget.name === WIDGET_NAME || widget.options?.serialize === false) continue;
    const value = widget.value;
    if (["number", "string", "boolean"].includes(typeof value)) values[widget.name] = value;
  }
  return values;
}

/**
 * The time shift a connected MODEL will apply, as far as the graph tells before running:
 * follows the "model" input upstream through model-to-model nodes to a ModelSamplingAuraFlow /
 * ModelSamplingSD3 node and reads its shift widget. Anything else (a loader, whose shift is read
 * from the files when the graph runs; Flux's resolution-dependent shift) is unknown here.
 */
function upstreamShift(node) {
  let current = node;
  for (let hop = 0; hop < MAX_HOPS; hop++) {
    const slot = current.inputs?.findIndex((input) => input.name === "model" || input.type === "MODEL") ?? -1;
    if (slot < 0 || current.inputs[slot].link == null) {
      return current === node ? { kind: "none" } : { kind: "unknown", source: current.title ?? current.type };
    }
    const source = current.getInputNode(slot);
    if (!source) return { kind: "unknown", source: "?" };
    if (RATIONAL_SHIFT_NODES.has(source.type)) {
      const shift = source.widgets?.find((w) => w.name === "shift")?.value;
      if (typeof shift === "number") return { kind: "shift", shift, source: source.title ?? source.type };
    }
    current = source;
  }
  return { kind: "unknown", source: "?" };
}

/** Route parameters and a note for the caption: what the node will compute, as far as known now. */
function previewRequest(node) {
  const params = widgetValues(node);
  let note = "";
  if (node.inputs?.some((input) => input.name === "model")) {
    const upstream = upstreamShift(node);
    if (upstream.kind === "shift") {
      params.shift = upstream.shift;
      note = `from ${upstream.source}`;
    } else if (upstream.kind === "unknown") {
      note = "unshifted here; the model's own shift is applied when run";
    } else {
      note = "unshifted (no model)";
    }
  }
  return { params, note };
}

function describe(params, sigmas, note) {
  const parts = [`${sigmas.length - 1} steps`];
  for (const [key, value] of Object.entries(params)) {
    if (key === "steps" || (key === "denoise" && value === 1)) continue;
    parts.push(`${key} ${typeof value === "number" ? Number(value.toPrecision(4)) : value}`);
  }
  if (note) parts.push(note);
  return parts.join(" · ");
}

class SigmaPreview {
  constructor(node) {
    this.node = node;
    this.key = null;
    this.requests = 0;
    this.timer = null;
    const { root, svg, caption } = createChartElement("lt-sigma-preview");
    Object.assign(this, { root, svg, caption });
    root.dataset.state = "empty";
    root.title = "σ per step from the node's own schedule (1 = noise, 0 = data)";
    this.widget = node.addDOMWidget(WIDGET_NAME, "lt_sigma_preview", root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => 150,
      getMaxHeight: () => 260,
    });
    this.widget.serialize = false; // not part of widgets_values in saved workflows
  }

  /** Fetch again if a widget value changed since the last request (cheap when nothing did). */
  refreshIfChanged() {
    const request = previewRequest(this.node);
    const key = JSON.stringify(request);
    if (key === this.key) return;
    this.key = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.fetch(request), DEBOUNCE_MS);
  }

  async fetch({ params, note }) {
    const request = ++this.requests;
    this.root.dataset.state = "loading";
    const query = new URLSearchParams({ node: this.node.comfyClass });
    for (const [key, value] of Object.entries(params)) query.set(key, String(value));
    let body;
    let ok = false;
    try {
      const response = await api.fetchApi(`/lumina_turbo/sigmas?${query}`);
      body = await response.json();
      ok = response.ok;
    } catch (error) {
      body = { error: `preview unavailable: ${error}` };
    }
    if (request !== this.requests) return; // a newer request owns the chart
    if (!ok || body?.error) {
      this.showError(body?.error ?? "preview unavailable");
      return;
    }
    if (body.sigmas.length < 2) {
      this.showError("empty schedule: nothing to sample (denoise 0)");
      return;
    }
    this.draw(body.sigmas, body.params, note);
  }

  showError(message) {
    this.svg.replaceChildren();
    this.caption.textContent = message;
    this.caption.style.color = "var(--error-text, #ff6b6b)";
    this.root.dataset.state = "error";
    this.root.dataset.sigmas = "[]";
  }

  draw(sigmas, params, note) {
    const points = sigmas.map((sigma, step) => [step, sigma]);
    drawLineChart(this.svg, {
      series: [{ points, color: CURVE_COLOR, dots: sigmas.length <= 64, name: "sigmas" }],
      xRange: [0, sigmas.length - 1],
      yRange: [0, 1],
      xLabel: "step",
      yLabel: "σ",
    });
    this.caption.textContent = describe(params, sigmas, note);
    this.caption.title = this.caption.textContent;
    this.caption.style.color = "";
    this.root.dataset.sigmas = JSON.stringify(sigmas);
    this.root.dataset.params = JSON.stringify(params);
    this.root.dataset.state = "ok";
    this.node.setDirtyCanvas?.(true, false);
  }
}

app.registerExtension({
  name: "LuminaTurbo.SigmaPreview",
  nodeCreated(node) {
    if (!SCHEDULE_NODES.has(node.comfyClass)) return;
    const preview = new SigmaPreview(node);
    node.ltSigmaPreview = preview;
    // Widget edits in the canvas, values restored from a saved workflow, and any other change
    // (seen on the next redraw) all lead to the same debounced refresh.
    chainCallback(node, "onWidgetChanged", () => preview.refreshIfChanged());
    chainCallback(node, "onConfigure", () => preview.refreshIfChanged());
    chainCallback(node, "onDrawForeground", () => preview.refreshIfChanged());
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width, 300), Math.max(node.size[1], height)]);
    preview.refreshIfChanged();
  },
});
