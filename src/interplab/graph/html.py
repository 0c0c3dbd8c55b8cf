"""An attribution graph as one standalone HTML page (plain HTML, SVG and JavaScript; no CDN).

Nodes are placed by layer (rows, embeddings at the bottom, the logit at the top) and position
(columns, one per prompt token); edges are lines whose width follows |weight| (blue positive,
red negative). Clicking a node shows its card: kind, layer, position, token, activation, and its
strongest incoming and outgoing edges (click one to move to that node).

The drawing lives in `graph.js`, which the web workbench serves as well; this page inlines it,
so the file stays self-contained.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from interplab.files import write_text

SCRIPT = Path(__file__).with_name("graph.js")

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
#left{flex:3;overflow:auto}#card{flex:1;padding:12px;border-left:1px solid #ccc;overflow:auto;font-size:13px}
.node{cursor:pointer;stroke:#333;stroke-width:.5}.node.sel{stroke:#000;stroke-width:2.5}
.graph-token{font-size:11px;fill:#444}.graph-row{font-size:11px;fill:#888}
table{border-collapse:collapse}td{padding:1px 6px}tr[data-i]{cursor:pointer}tr[data-i]:hover{background:#eef}
</style></head><body>
<div id="left"><h3 style="margin:8px">__TITLE__</h3><svg id="g"></svg></div>
<div id="card"><p>Click a node.</p></div>
<script id="data" type="application/json">__DATA__</script>
<script>
__SCRIPT__
renderGraph(JSON.parse(document.getElementById("data").textContent), document.getElementById("g"),
            document.getElementById("card"));
</script></body></html>
"""


def graph_script() -> str:
    """The shared drawing script (`graph.js`)."""
    return SCRIPT.read_text(encoding="utf-8")


def graph_html(data: dict, title: str = "") -> str:
    """The page for a graph's JSON dict (`Graph.to_dict()`)."""
    title = title or f"attribution graph: {data['target']['token']!r} after {''.join(data['tokens'])!r}"
    payload = json.dumps(data).replace("</", "<\\/")  # no "</script>" inside the JSON block
    # one pass over the template, so text in the title or data can never be read as a placeholder
    parts = {"__TITLE__": html.escape(title), "__DATA__": payload, "__SCRIPT__": graph_script()}
    return _fill(_PAGE, parts)


def _fill(template: str, parts: dict[str, str]) -> str:
    import re

    return re.sub("|".join(map(re.escape, parts)), lambda m: parts[m.group(0)], template)


def write_graph_html(data: dict, path: str | Path, title: str = "") -> Path:
    return write_text(path, graph_html(data, title))
