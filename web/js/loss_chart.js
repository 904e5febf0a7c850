// Live loss chart on LTLoraTrainer, fed by the server event "lumina_turbo.train_progress" that the
// trainer sends after every optimizer step: {node: unique_id, step, total, loss, lr}.
// A step that is not after the last one seen starts a new curve (a new or resumed run).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { createChartElement, drawLineChart } from "./lt_common.js";

const TRAINER_NODES = new Set(["LTLoraTrainer"]);
const EVENT = "lumina_turbo.train_progress";
const WIDGET_NAME = "loss_chart";
const LOSS_COLOR = "#8f8f8f";
const SMOOTH_COLOR = "#ff9b3d";
const EMA = 0.9;
const MAX_POINTS = 2000; // keep the DOM small on long runs: thin out evenly beyond this

function formatNumber(value, digits = 4) {
  if (!Number.isFinite(value)) return String(value);
  return Math.abs(value) >= 0.001 ? String(Number(value.toPrecision(digits))) : value.toExponential(2);
}

class LossChart {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.total = 0;
    this.lr = null;
    const { root, svg, caption } = createChartElement("lt-loss-chart");
    Object.assign(this, { root, svg, caption });
    root.dataset.steps = "0";
    caption.textContent = "loss per optimizer step appears here while training runs";
    this.widget = node.addDOMWidget(WIDGET_NAME, "lt_loss_chart", root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => 150,
      getMaxHeight: () => 300,
    });
    this.widget.serialize = false;
  }

  add({ step, total, loss, lr }) {
    const last = this.points.at(-1);
    if (last && step <= last[0]) this.points = [];
    this.points.push([step, loss]);
    if (this.points.length > MAX_POINTS) this.points = this.points.filter((_, i) => i % 2 === 0);
    this.total = total;
    this.lr = lr;
    this.draw();
  }

  draw() {
    const losses = this.points.map(([, loss]) => loss).filter(Number.isFinite);
    // Bias-corrected exponential moving average (as TensorBoard draws it): no lag from a zero start.
    let ema = 0;
    let smooth = null;
    const smoothed = this.points.map(([step, loss], i) => {
      ema = EMA * ema + (1 - EMA) * loss;
      smooth = ema / (1 - EMA ** (i + 1));
      return [step, smooth];
    });
    const low = Math.min(...losses);
    const high = Math.max(...losses);
    const margin = (high - low) * 0.05 || Math.abs(high) * 0.05 || 0.05;
    drawLineChart(this.svg, {
      series: [
        { points: this.points, color: LOSS_COLOR, width: 1, name: "loss" },
        { points: smoothed, color: SMOOTH_COLOR, width: 2, name: "smoothed" },
      ],
      xRange: [0, Math.max(this.total, this.points.at(-1)?.[0] ?? 1)],
      yRange: [Math.max(0, low - margin), high + margin],
      xLabel: "step",
      yLabel: "loss",
    });
    const [step, loss] = this.points.at(-1);
    const lr = this.lr === null || this.lr === undefined ? "" : ` · lr ${formatNumber(this.lr, 3)}`;
    this.caption.textContent = `step ${step}/${this.total} · loss ${formatNumber(loss)} · smoothed ${formatNumber(smooth)}${lr}`;
    this.root.dataset.steps = String(this.points.length);
    this.root.dataset.lastLoss = String(loss);
    this.node.setDirtyCanvas?.(true, false);
  }
}

function trainerNode(id) {
  // unique_id is the node id as a string ("12"); inside a subgraph it is a path ("5:12").
  const graph = app.rootGraph ?? app.graph;
  const direct = graph.getNodeById(id) ?? graph.getNodeById(Number(id));
  if (direct) return direct;
  const path = String(id).split(":");
  let current = graph;
  let node = null;
  for (const part of path) {
    node = current?.getNodeById(part) ?? current?.getNodeById(Number(part));
    current = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "LuminaTurbo.LossChart",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === undefined) return;
      const node = trainerNode(detail.node);
      node?.ltLossChart?.add(detail);
    });
  },
  nodeCreated(node) {
    if (!TRAINER_NODES.has(node.comfyClass)) return;
    node.ltLossChart = new LossChart(node);
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width, 320), Math.max(node.size[1], height)]);
  },
});
