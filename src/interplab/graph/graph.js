// Drawing an attribution graph (interplab.graph JSON, format_version 1) as SVG, with a node card on
// click. Shared by the standalone page (graph/html.py inlines this file) and the web workbench
// (served as /static/graph.js). Plain JavaScript, no dependency, nothing fetched.
"use strict";

const GRAPH_SVG_NS = "http://www.w3.org/2000/svg";
const GRAPH_COLOURS = { embedding: "#9e9e9e", feature: "#7fbf7b", error: "#f4a582", logit: "#fdb863" };
const GRAPH_COLUMN = 110, GRAPH_ROW = 90, GRAPH_LEFT = 100; // x of the first column's centre

function graphEscape(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function graphNodeLabel(n) {
  if (n.kind === "feature") return `L${n.layer} #${n.feature}`;
  if (n.kind === "error") return `error L${n.layer}`;
  if (n.kind === "logit") return `logit ${JSON.stringify(n.token)}`;
  return `embedding ${JSON.stringify(n.token)}`;
}

// Refuse anything that is not a graph this script can draw (a wrong file picked, another version).
function checkGraph(G) {
  if (!G || G.format_version !== 1 || !Array.isArray(G.nodes) || !Array.isArray(G.edges) || !Array.isArray(G.tokens)) {
    throw new Error("not an interplab attribution graph (graph.json with format_version 1)");
  }
  const n = G.nodes.length;
  for (const e of G.edges) {
    if (!(e.source >= 0 && e.source < n && e.target >= 0 && e.target < n)) throw new Error("graph edge points outside the nodes");
  }
}

// Row of a node: embeddings at the bottom (0), layer L at L + 1, the logit on top.
function graphLayout(G) {
  const nLayers = Math.max(0, ...G.nodes.filter((n) => n.kind !== "logit").map((n) => (n.layer === null ? 0 : n.layer))) + 1;
  const width = GRAPH_COLUMN * G.tokens.length + GRAPH_LEFT + 20, height = GRAPH_ROW * (nLayers + 2) + 60;
  const row = (n) => (n.kind === "embedding" ? 0 : n.kind === "logit" ? nLayers + 1 : n.layer + 1);
  const count = {}, rank = [];
  G.nodes.forEach((n) => { const key = row(n) + ":" + n.position; rank.push(count[key] || 0); count[key] = (count[key] || 0) + 1; });
  // nodes that share a layer and position spread over 80 px around the column's centre
  const points = G.nodes.map((n, i) => {
    const k = count[row(n) + ":" + n.position];
    return { x: GRAPH_LEFT + GRAPH_COLUMN * n.position + (k > 1 ? (rank[i] / (k - 1) - 0.5) * 80 : 0), y: height - 50 - GRAPH_ROW * row(n) };
  });
  const rows = [["embeddings", 0], ...Array.from({ length: nLayers }, (_, L) => [`layer ${L}`, L + 1]), ["logit", nLayers + 1]]
    .map(([name, r]) => ({ name, y: height - 50 - GRAPH_ROW * r }));
  return { width, height, points, rows };
}

function graphSvg(tag, attributes) {
  const element = document.createElementNS(GRAPH_SVG_NS, tag);
  for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, v);
  return element;
}

// Draw graph G into the <svg> element `svg`; a click on a node fills `card`. Options: `extraCard(node,
// index)` may return a promise of more HTML for the card (the workbench adds a feature's logit
// effects); `fitWidth` (px) shrinks a wider drawing to that width, down to half size (then it scrolls).
function renderGraph(G, svg, card, options = {}) {
  checkGraph(G);
  const { width, height, points, rows } = graphLayout(G);
  const scale = options.fitWidth && width > options.fitWidth ? Math.max(0.5, options.fitWidth / width) : 1;
  svg.innerHTML = "";
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", Math.round(width * scale));
  svg.setAttribute("height", Math.round(height * scale));
  rows.forEach((r) => {
    const text = graphSvg("text", { x: 4, y: r.y + 4, class: "graph-row" });
    text.textContent = r.name;
    svg.appendChild(text);
  });
  const maxWeight = Math.max(1e-9, ...G.edges.map((e) => Math.abs(e.weight)));
  const lines = G.edges.map((e) => {
    const s = points[e.source], t = points[e.target];
    const line = graphSvg("line", { x1: s.x, y1: s.y, x2: t.x, y2: t.y, class: "edge",
      stroke: e.weight > 0 ? "#2166ac" : "#b2182b", "stroke-opacity": 0.5,
      "stroke-width": 0.3 + 4 * Math.abs(e.weight) / maxWeight });
    svg.appendChild(line);
    return line;
  });
  const hover = (i, on) => G.edges.forEach((e, j) => {
    if (e.source === i || e.target === i) lines[j].setAttribute("stroke-opacity", on ? 0.95 : 0.5);
  });
  G.nodes.forEach((n, i) => {
    const p = points[i];
    const shape = n.kind === "error"
      ? graphSvg("rect", { x: p.x - 5, y: p.y - 5, width: 10, height: 10 })
      : graphSvg("circle", { cx: p.x, cy: p.y, r: n.kind === "logit" ? 9 : 6 });
    shape.setAttribute("fill", GRAPH_COLOURS[n.kind] || "#ccc");
    shape.setAttribute("class", "node");
    shape.dataset.i = i;
    shape.dataset.kind = n.kind;
    const title = graphSvg("title", {});
    title.textContent = `${graphNodeLabel(n)} @${n.position}: value ${Number(n.value).toFixed(3)}`;
    shape.appendChild(title);
    shape.addEventListener("mouseenter", () => hover(i, true));
    shape.addEventListener("mouseleave", () => hover(i, false));
    shape.addEventListener("click", () => showGraphNode(G, i, svg, card, options));
    svg.appendChild(shape);
  });
  G.tokens.forEach((t, p) => {
    const text = graphSvg("text", { x: GRAPH_LEFT + GRAPH_COLUMN * p - 20, y: height - 15, class: "graph-token" });
    text.textContent = JSON.stringify(t);
    svg.appendChild(text);
  });
}

function graphEdgeRows(G, list, key) {
  return list.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10).map((e) => {
    const other = G.nodes[e[key]];
    return `<tr data-i="${e[key]}"><td>${graphEscape(`${graphNodeLabel(other)} @${other.position}`)}</td><td>${Number(e.weight).toFixed(4)}</td></tr>`;
  }).join("");
}

async function showGraphNode(G, i, svg, card, options) {
  svg.querySelectorAll(".node").forEach((c) => c.classList.toggle("sel", Number(c.dataset.i) === i));
  const n = G.nodes[i];
  const inputs = G.edges.filter((e) => e.target === i), outputs = G.edges.filter((e) => e.source === i);
  card.dataset.node = i;
  card.innerHTML = `<h3>${graphEscape(graphNodeLabel(n))}</h3>
    <p>position ${graphEscape(n.position)} (token ${graphEscape(JSON.stringify(n.token))})<br>value ${Number(n.value).toFixed(4)}` +
    (n.influence !== undefined ? `<br>influence ${Number(n.influence).toFixed(4)}` : "") + `</p>
    <h4>strongest inputs</h4><table class="graph-inputs">${graphEdgeRows(G, inputs, "source")}</table>
    <h4>strongest outputs</h4><table class="graph-outputs">${graphEdgeRows(G, outputs, "target")}</table>
    <div class="graph-extra"></div>`;
  // a row of the inputs or outputs opens that node's card
  card.querySelectorAll("tr[data-i]").forEach((tr) => tr.addEventListener("click", () => showGraphNode(G, Number(tr.dataset.i), svg, card, options)));
  if (!options.extraCard) return;
  const extra = card.querySelector(".graph-extra");
  try {
    const html = await options.extraCard(n, i);
    if (html && Number(card.dataset.node) === i) extra.innerHTML = html; // still the node shown
  } catch (error) {
    extra.textContent = error.message;
  }
}
