"""Features as directions: arithmetic on token embeddings, and any direction read in vocabulary terms.

Word vectors add up (Mikolov et al. 2013, "king - man + woman ~ queen"); language models'
embedding and unembedding matrices keep much of that structure. `embedding_arithmetic`
evaluates an expression over the rows of either matrix and returns the nearest tokens by
cosine similarity, leaving out the words of the expression. `vocab_projection` reads any
direction of the residual stream (a steering vector, an SAE decoder row) through the final
norm's gain and the unembedding, like the logit lens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from interplab.analysis.tasks import token_texts
from interplab.models.handle import LoadedModel, as_loaded
from interplab.types import ModelLike

SPACES = ("embed", "unembed")
_TERM = re.compile(r"""\s*([+-])?\s*(?:(\d+(?:\.\d+)?)\s*\*\s*)?("[^"]*"|'[^']*'|[^\s+\-*"']+)\s*""")


@dataclass(frozen=True)
class Term:
    """One word of an expression, with its coefficient and token ids."""

    word: str
    coefficient: float
    token_ids: tuple[int, ...]


def parse_expression(expression: str) -> list[tuple[float, str]]:
    """"king - man + woman" -> [(1, "king"), (-1, "man"), (1, "woman")]. Quote words with spaces or
    signs ("'New York' - ..."); a number and * scales a word ("2*king")."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the expression is empty; write e.g. 'king - man + woman'")
    terms, pos = [], 0
    while pos < len(expression):
        match = _TERM.match(expression, pos)
        if match is None or match.end() == pos or (terms and match.group(1) is None):
            raise ValueError(f"cannot read the expression {expression!r} at character {pos}: write words "
                             "joined by + and -, e.g. 'king - man + woman' (quote words with spaces)")
        sign = -1.0 if match.group(1) == "-" else 1.0
        coefficient = float(match.group(2)) if match.group(2) else 1.0
        terms.append((sign * coefficient, match.group(3).strip("'\"")))
        pos = match.end()
    return terms


def embedding_arithmetic(model: ModelLike, expression: str, *, space: str = "embed", top_k: int = 10,
                         leading_space: bool = True, multi_token: str = "error",
                         exclude_inputs: bool = True) -> list[tuple[str, float]]:
    """The tokens nearest (by cosine) to the sum of the expression's word vectors.

    `space`: "embed" (input embeddings) or "unembed" (rows of the output matrix; the same for
    tied models). Words get a leading space (" king", how words appear mid-sentence) unless
    `leading_space=False`. A word of several tokens raises an error, or with
    `multi_token="mean"` counts as the mean of its tokens' vectors. The expression's own tokens
    are left out of the answer (they are usually nearest) unless `exclude_inputs=False`.
    """
    model = as_loaded(model)
    if multi_token not in ("error", "mean"):
        raise ValueError(f"multi_token must be 'error' or 'mean', got {multi_token!r}")
    matrix = _matrix(model, space)
    terms = _terms(model, parse_expression(expression), leading_space, multi_token)
    vector = sum(t.coefficient * matrix[list(t.token_ids)].mean(0) for t in terms)
    exclude = {i for t in terms for i in t.token_ids} if exclude_inputs else set()
    return nearest_tokens(model, vector, matrix, top_k=top_k, exclude=exclude)


def _matrix(model: LoadedModel, space: str) -> Tensor:
    if space not in SPACES:
        raise ValueError(f"space must be 'embed' or 'unembed', got {space!r}")
    module = model.embed if space == "embed" else model.unembed
    return module.weight.detach().float().cpu()  # (vocab, d_model)


def _terms(model: LoadedModel, parsed: list[tuple[float, str]], leading_space: bool, multi_token: str) -> list[Term]:
    tokenizer = model.require_tokenizer()
    terms = []
    for coefficient, word in parsed:
        text = (" " + word) if leading_space and not word.startswith(" ") else word
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"the word {word!r} has no tokens")
        if len(ids) > 1 and multi_token == "error":
            raise ValueError(
                f"{text!r} is {len(ids)} tokens {token_texts(tokenizer, ids)}; embedding "
                "arithmetic works on single tokens. Pick another word, try leading_space=False, or pass "
                "multi_token='mean' to use the mean of its token vectors.")
        terms.append(Term(word, coefficient, ids))
    return terms


def nearest_tokens(model: ModelLike, vector: Tensor, matrix: Tensor, *, top_k: int = 10,
                   exclude: set[int] | frozenset = frozenset()) -> list[tuple[str, float]]:
    """The top_k rows of `matrix` (vocab, d) most cosine-similar to `vector`, as (token, cosine)."""
    model = as_loaded(model)
    cosine = torch.nn.functional.normalize(matrix, dim=-1) @ torch.nn.functional.normalize(vector.float(), dim=0)
    if exclude:
        cosine[list(exclude)] = float("-inf")
    top = cosine.topk(min(top_k, len(cosine)))
    tokens = token_texts(model.require_tokenizer(), top.indices.tolist())
    return list(zip(tokens, top.values.tolist()))


def vocab_projection(model: ModelLike, direction, *, top_k: int = 10, through_norm: bool = True) -> dict[str, list[tuple[str, float]]]:
    """Which tokens a residual-stream direction promotes and suppresses: (W_U @ (gain * d)) with the
    final norm's gain (and centring, for LayerNorm) applied when `through_norm`.

    `direction`: a tensor (d_model,), e.g. a steering vector or an SAE decoder row, or an object
    with a `.vector` tensor. Returns {"top": [(token, logit)], "bottom": [...]}.
    """
    model = as_loaded(model)
    vector = _as_direction(model, direction)
    if through_norm:
        from interplab.analysis.lens import final_norm

        norm = final_norm(model)
        vector = norm.centred(vector) * norm.gain
    logits = model.unembed.weight.detach().float().cpu() @ vector  # (vocab,)
    tokenizer = model.require_tokenizer()
    k = min(top_k, len(logits))
    top, bottom = logits.topk(k), (-logits).topk(k)
    return {"top": list(zip(token_texts(tokenizer, top.indices.tolist()), top.values.tolist())),
            "bottom": list(zip(token_texts(tokenizer, bottom.indices.tolist()), (-bottom.values).tolist()))}


def _as_direction(model: LoadedModel, direction) -> Tensor:
    if hasattr(direction, "vector") and not isinstance(direction, Tensor):
        direction = direction.vector
    try:
        vector = torch.as_tensor(direction).detach().float().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"expected a direction tensor of shape ({model.d_model},), got {type(direction).__name__}") from None
    if vector.shape != (model.d_model,):
        raise ValueError(f"the direction has shape {tuple(vector.shape)} but {model.model_id} has "
                         f"d_model={model.d_model}; it was made for another model or site")
    if not torch.isfinite(vector).all() or float(vector.norm()) == 0:
        raise ValueError("the direction must be finite and non-zero")
    return vector
