"""Attribution graphs (circuit tracing): the local replacement model of one prompt with
transcoders in place of MLPs, direct effects between features, pruning by influence, checks by
intervention, JSON and a standalone HTML page. Names load on first use."""

from __future__ import annotations

from interplab._lazy import lazy_attributes

_EXPORTS = {
    "ReplacementModel": "interplab.graph.replacement",
    "Graph": "interplab.graph.attribution",
    "attribute": "interplab.graph.attribution",
    "prune": "interplab.graph.prune",
    "node_influence": "interplab.graph.prune",
    "check_interventions": "interplab.graph.check",
    "predicted_change": "interplab.graph.check",
    "measured_change": "interplab.graph.check",
    "write_graph_html": "interplab.graph.html",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes("interplab.graph", _EXPORTS, __all__)
