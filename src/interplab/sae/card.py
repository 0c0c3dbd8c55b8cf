"""An HTML card for one SAE latent, readable in any browser and without interplab.

It shows, from a feature index (`interplab.sae.features`): the label, density and activation
statistics; the top-activating contexts with each token shaded by the latent's activation
(hover for the value); the tokens the decoder direction promotes and suppresses; and the
histogram of non-zero activations. Everything is in one self-contained file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from interplab.files import write_text
from interplab.sae.features import FeatureIndex, TopContext

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { margin-bottom: 0.2em; } .label { font-size: 1.2em; color: #555; margin-top: 0; }
.stats td { padding: 0.1em 1em 0.1em 0; } .muted { color: #777; font-size: 0.9em; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; border-bottom: 1px solid #eee;
       padding: 0.3em 0; line-height: 1.6; }
.ctx .value { display: inline-block; min-width: 4.5em; color: #777; }
.tok { border-radius: 2px; } .max { outline: 1px solid #c40; }
.effects { display: flex; gap: 3em; } .effects td { font-family: ui-monospace, monospace; padding-right: 1em; }
.pos { color: #1a7f37; } .neg { color: #c62828; }
"""


def write_feature_card(index: FeatureIndex | str | Path, feature: int, path: str | Path, *,
                       n_contexts: int = 20, window: tuple[int, int] = (32, 8)) -> Path:
    """Write the HTML card of `feature` to `path` (atomically) and return the path.

    window: tokens shown before and after each context's maximum."""
    own = not isinstance(index, FeatureIndex)
    idx = FeatureIndex(index) if own else index
    try:
        page = render_feature_card(idx, feature, n_contexts=n_contexts, window=window)
    finally:
        if own:
            idx.close()
    return write_text(path, page)


def render_feature_card(index: FeatureIndex, feature: int, *, n_contexts: int = 20,
                        window: tuple[int, int] = (32, 8)) -> str:
    """The card's HTML as a string."""
    summary = index.summary(feature)
    meta = index.meta
    title = f"Feature {feature}" + (f" · {summary.label}" if summary.label else "")
    contexts = index.top_contexts(feature, n_contexts)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Feature {feature}</h1>",
        f'<p class="label">{_e(summary.label) or "(never fired on the indexed corpus)"}</p>',
        _stats_table(summary, meta),
        "<h2>Top-activating contexts</h2>",
        "".join(_context_html(c, window) for c in contexts) or "<p>No context activates this latent.</p>",
        "<h2>Logit effects</h2>", _effects_html(index, feature),
        "<h2>Activation histogram</h2>", _histogram_svg(*index.histogram(feature)),
        "</body></html>",
    ]
    return "\n".join(parts)


@dataclass(frozen=True)
class FeatureCard:
    """A rendered card; shows inline in Jupyter (the same view as the workbench's feature browser)."""

    feature: int
    html: str

    def _repr_html_(self) -> str:
        # an iframe keeps the card's styles from leaking into the notebook
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
                'style="width: 100%; height: 640px; border: 1px solid #ddd"></iframe>')


def feature_card(index: FeatureIndex, feature: int, *, n_contexts: int = 20,
                 window: tuple[int, int] = (32, 8)) -> FeatureCard:
    """The card of `feature` as an object that renders inline in Jupyter."""
    return FeatureCard(feature, render_feature_card(index, feature, n_contexts=n_contexts, window=window))


def _stats_table(summary, meta: dict) -> str:
    rows = [
        ("model", meta.get("model_id")), ("site", meta.get("site")),
        ("density", f"{summary.density:.4%} of {meta.get('n_tokens')} tokens"),
        ("max activation", f"{summary.max_act:.4g}"), ("mean when active", f"{summary.mean_act:.4g}"),
    ]
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{_e(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="stats">{cells}</table>'


def _context_html(context: TopContext, window: tuple[int, int]) -> str:
    start = max(0, context.max_pos - window[0])
    stop = min(len(context.tokens), context.max_pos + window[1] + 1)
    peak = max(context.activation, 1e-12)
    spans = []
    for pos in range(start, stop):
        value = context.acts[pos]
        alpha = min(max(value / peak, 0.0), 1.0)
        style = f"background: rgba(255, 120, 0, {alpha:.2f})" if value > 0 else ""
        cls = "tok max" if pos == context.max_pos else "tok"
        text = context.tokens[pos].replace("\n", "↵")
        spans.append(f'<span class="{cls}" style="{style}" title="{value:.3f}">{_e(text)}</span>')
    return f'<div class="ctx"><span class="value">{context.activation:.3f}</span>{"".join(spans)}</div>'


def _effects_html(index: FeatureIndex, feature: int) -> str:
    effects = index.logit_effects(feature)
    folded = ("W_U (γ ⊙ W_dec[i]): the final norm's weight γ is folded in" if effects.fold_norm
              else "W_U W_dec[i]: the final norm's weight is not folded in")

    def table(title: str, rows, cls: str) -> str:
        body = "".join(f'<tr><td>{_e(repr(t))}</td><td class="{cls}">{v:+.3f}</td></tr>' for t, v in rows)
        return f"<div><h3>{title}</h3><table>{body}</table></div>"

    return (f'<p class="muted">{_e(folded)}</p><div class="effects">'
            + table("promoted", effects.promoted, "pos") + table("suppressed", effects.suppressed, "neg") + "</div>")


def _histogram_svg(edges: list[float], counts: list[int], width: int = 600, height: int = 160) -> str:
    top = max(counts) if counts and max(counts) > 0 else 0
    if top == 0:
        return "<p>No non-zero activation.</p>"
    bar = width / len(counts)
    rects = []
    for i, count in enumerate(counts):
        h = (height - 20) * count / top
        rects.append(f'<rect x="{i * bar:.1f}" y="{height - 20 - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                     f'fill="#f08030"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {count}</title></rect>')
    labels = (f'<text x="0" y="{height - 4}" font-size="11">0</text>'
              f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{"".join(rects)}{labels}</svg>'
            f'<p class="muted">{sum(counts)} non-zero activations; tallest bar {top}</p>')


def _e(text) -> str:
    return html.escape(str(text) if text is not None else "")
