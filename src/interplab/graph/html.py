"""An attribution graph as one standalone HTML page (plain HTML, SVG and JavaScript; no CDN).

Nodes are placed by layer (rows, embeddings at the bottom, the logit at the top) and position
(columns, one per prompt token); edges are lines whose width follows |weight| (blue positive,
red negative). Clicking a node shows its card: kind, layer, position, token, activation, and its
strongest incoming and outgoing edges.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from interplab.files import write_text

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
#left{flex:3;overflow:auto}#card{flex:1;padding:12px;border-left:1px solid #ccc;overflow:auto;font-size:13px}
.node{cursor:pointer;stroke:#333;stroke-width:.5}.node.sel{stroke:#000;stroke-width:2.5}
.tok{font-size:11px;fill:#444}table{border-collapse:collapse}td{padding:1px 6px}
</style></head><body>
<div id="left"><h3 style="margin:8px">__TITLE__</h3><svg id="g"></svg></div>
<div id="card"><p>Click a node.</p></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const G = JSON.parse(document.getElementById('data').textContent);
const nLayers = Math.max(...G.nodes.map(n => n.layer === null ? 0 : n.layer)) + 1;
const W = 110 * G.tokens.length + 80, H = 90 * (nLayers + 2) + 60;
const svg = document.getElementById('g'); svg.setAttribute('width', W); svg.setAttribute('height', H);
const NS = 'http://www.w3.org/2000/svg';
const slot = {};
function row(n){ return n.kind === 'embedding' ? 0 : n.kind === 'logit' ? nLayers + 1 : n.layer + 1; }
G.nodes.forEach((n, i) => { const key = row(n) + ':' + n.position; slot[key] = (slot[key] || 0) + 1; n._k = slot[key] - 1; n._key = key; });
G.nodes.forEach(n => { const count = slot[n._key]; n.x = 60 + 110 * n.position + (count > 1 ? (n._k / (count - 1) - 0.5) * 80 : 0);
  n.y = H - 50 - 90 * row(n); });
const maxW = Math.max(1e-9, ...G.edges.map(e => Math.abs(e.weight)));
G.edges.forEach(e => { const s = G.nodes[e.source], t = G.nodes[e.target]; const l = document.createElementNS(NS, 'line');
  l.setAttribute('x1', s.x); l.setAttribute('y1', s.y); l.setAttribute('x2', t.x); l.setAttribute('y2', t.y);
  l.setAttribute('stroke', e.weight > 0 ? '#2166ac' : '#b2182b'); l.setAttribute('stroke-opacity', 0.5);
  l.setAttribute('stroke-width', 0.3 + 4 * Math.abs(e.weight) / maxW); svg.appendChild(l); });
const colour = {embedding: '#9e9e9e', feature: '#7fbf7b', error: '#f4a582', logit: '#fdb863'};
G.nodes.forEach((n, i) => { const c = document.createElementNS(NS, n.kind === 'error' ? 'rect' : 'circle');
  if (n.kind === 'error') { c.setAttribute('x', n.x - 5); c.setAttribute('y', n.y - 5); c.setAttribute('width', 10); c.setAttribute('height', 10); }
  else { c.setAttribute('cx', n.x); c.setAttribute('cy', n.y); c.setAttribute('r', n.kind === 'logit' ? 9 : 6); }
  c.setAttribute('fill', colour[n.kind]); c.setAttribute('class', 'node'); c.dataset.i = i;
  c.addEventListener('click', () => show(i)); svg.appendChild(c); });
G.tokens.forEach((t, p) => { const tx = document.createElementNS(NS, 'text'); tx.setAttribute('x', 60 + 110 * p - 20);
  tx.setAttribute('y', H - 15); tx.setAttribute('class', 'tok'); tx.textContent = JSON.stringify(t); svg.appendChild(tx); });
function label(n){ return n.kind === 'feature' ? `L${n.layer} #${n.feature}` : n.kind === 'error' ? `error L${n.layer}` :
  n.kind === 'logit' ? `logit ${JSON.stringify(n.token)}` : `embedding ${JSON.stringify(n.token)}`; }
function esc(s){ return String(s).replace(/[&<>]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;'}[c])); }
function rows(list, key){ return list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 10)
  .map(e => `<tr><td>${esc(label(G.nodes[e[key]]))} @${G.nodes[e[key]].position}</td><td>${e.weight.toFixed(4)}</td></tr>`).join(''); }
function show(i){ document.querySelectorAll('.node').forEach(c => c.classList.toggle('sel', +c.dataset.i === i));
  const n = G.nodes[i]; const inc = G.edges.filter(e => e.target === i), out = G.edges.filter(e => e.source === i);
  document.getElementById('card').innerHTML = `<h3>${esc(label(n))}</h3><p>position ${n.position} (token ${esc(JSON.stringify(n.token))})<br>
  value ${n.value.toFixed(4)}${n.influence !== undefined ? '<br>influence ' + n.influence.toFixed(4) : ''}</p>
  <h4>strongest inputs</h4><table>${rows(inc, 'source')}</table><h4>strongest outputs</h4><table>${rows(out, 'target')}</table>`; }
</script></body></html>
"""


def graph_html(data: dict, title: str = "") -> str:
    """The page for a graph's JSON dict (`Graph.to_dict()`)."""
    title = title or f"attribution graph: {data['target']['token']!r} after {''.join(data['tokens'])!r}"
    payload = json.dumps(data).replace("</", "<\\/")  # no "</script>" inside the JSON block
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_graph_html(data: dict, path: str | Path, title: str = "") -> Path:
    return write_text(path, graph_html(data, title))
