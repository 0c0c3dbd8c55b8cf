"""One head's attention pattern on one prompt: the workbench's attention view, as a value that
renders the same table inline in Jupyter (`_repr_html_`)."""

from __future__ import annotations

import html
from dataclasses import dataclass

from torch import Tensor

from interplab.sites import check_layer
from interplab.types import ModelLike


@dataclass(frozen=True)
class AttentionPattern:
    """`pattern[q, k]`: how much the token at position q attends to position k (rows sum to 1)."""

    tokens: list[str]
    layer: int
    head: int
    pattern: Tensor  # (q, k) float32, causal: zero above the diagonal

    def __repr__(self) -> str:
        return (f"AttentionPattern(L{self.layer}H{self.head}, {len(self.tokens)} tokens; .pattern[q, k], "
                "or display it in a notebook)")

    def _repr_html_(self) -> str:
        """Rows are queries, columns keys; each cell shaded by its weight (hover for the number)."""
        head = "".join(f"<th>{html.escape(repr(t))}</th>" for t in self.tokens)
        rows = []
        for q, token in enumerate(self.tokens):
            cells = "".join(
                f'<td style="background: rgba(220, 38, 38, {float(self.pattern[q, k]):.3f})" '
                f'title="{float(self.pattern[q, k]):.3f}">&nbsp;</td>' for k in range(len(self.tokens)))
            rows.append(f"<tr><th>{html.escape(repr(token))}</th>{cells}</tr>")
        return (f'<table class="interplab-attention" style="font-family: monospace; border-collapse: collapse">'
                f"<caption>attention L{self.layer}H{self.head} (rows: queries, columns: keys)</caption>"
                f"<tr><th></th>{head}</tr>{''.join(rows)}</table>")


def attention_pattern(model: ModelLike, prompt: str, layer: int, head: int) -> AttentionPattern:
    """Head `head` of block `layer` on `prompt` (capture switches to eager attention to read it)."""
    from interplab.cache import capture
    from interplab.models.handle import as_loaded
    from interplab.analysis.tasks import token_texts

    model = as_loaded(model)
    layer = check_layer(layer, model.n_layers, model.model_id)
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < model.n_heads:
        raise ValueError(f"head {head!r} is out of range: {model.model_id} has {model.n_heads} heads per "
                         f"block (valid 0..{model.n_heads - 1})")
    site = f"blocks.{layer}.attn.hook_pattern"
    ids = model.require_tokenizer()(prompt)["input_ids"]
    pattern = capture(model, [site], [ids])[site][0, head].float()  # (heads, q, k) -> (q, k)
    return AttentionPattern(token_texts(model.tokenizer, ids), layer, head, pattern)
