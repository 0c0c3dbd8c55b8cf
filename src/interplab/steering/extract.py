"""Build steering vectors from contrast pairs.

For each pair (p, c+, c-) and layer L the residual activation a_L is read at one
position (or averaged over the completion) of the texts p + c+ and p + c-. Methods:

- mean_diff (CAA; Panickssery et al. 2024): v = 1/|D| sum_i [a_L(p_i, c+_i) - a_L(p_i, c-_i)].
- pca_diff (repeng "pca_diff"; Zou et al. 2023, representation engineering): the first
  principal component of the differences d_i after subtracting their mean (as sklearn's
  PCA does), i.e. the axis along which the differences vary most.
- pca_center (repeng "pca_center"): the first principal component of the activations
  centred on each pair's midpoint, rows +d_i/2 and -d_i/2; equal to the top right singular
  vector of the uncentred differences.
- logistic: the weight vector of an L2-regularised logistic-regression probe separating
  positive from negative activations (Alain & Bengio 2016).

The unit directions of the last three are signed so positives project higher and scaled
to v = (m . u) u, the mean difference m's component along u, so that a multiplier means
the same size of push whichever method made the vector.

Read position ("read"): "answer" (the answer-letter token of an A/B completion, as CAA
reads "A" in "(A)"), "last" (the last token), "mean" (mean over the completion's tokens),
"auto" (answer for A/B data, else last).

The activations of every layer come from one batched, padded forward pass per batch
(texts are sorted by length so batches carry little padding; the pass stops after the
deepest requested layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.cache import capture
from interplab.models.handle import LoadedModel, as_loaded
from interplab.progress import progress as progress_items
from interplab.steering.datasets import ContrastDataset, ContrastPair
from interplab.steering.vector import STEERABLE_SITES, SteeringVector
from interplab.sites import resolve_layers
from interplab.tokens import check_context
from interplab.types import ModelLike

METHODS = ("mean_diff", "pca_diff", "pca_center", "logistic")
READS = ("auto", "answer", "last", "mean")


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of one text and the token span [start, stop) whose activations are read."""

    ids: tuple[int, ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class PairActivations:
    """Activations read from the positive and negative texts, for several layers."""

    positive: Float[Tensor, "pairs layers d_model"]
    negative: Float[Tensor, "pairs layers d_model"]
    layers: tuple[int, ...]

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        i = self.layers.index(layer)
        return self.positive[:, i], self.negative[:, i]


@dataclass(frozen=True)
class LayerScore:
    """How well one layer's direction separates held-out positives from negatives."""

    layer: int
    accuracy: float
    """Held-out activations on the right side of the midpoint between the training class
    means, projected on the direction (0.5 = chance)."""
    pair_accuracy: float
    """Held-out pairs whose positive projects higher than its negative."""
    norm: float
    """Norm of the layer's vector (fitted on all pairs)."""
    n_train: int
    """Pairs the scoring direction was fitted on."""
    n_test: int
    """Held-out pairs it was scored on."""


@dataclass(frozen=True)
class Extraction:
    """The vector (fitted on every pair) and the per-layer held-out report."""

    vector: SteeringVector
    report: tuple[LayerScore, ...]
    """Empty when nothing was held out."""

    def __repr__(self) -> str:
        scores = ", ".join(f"L{s.layer} {s.accuracy:.2f}" for s in self.report)
        report = f"; held-out accuracy {scores}; best layer {self.best_layer()}" if self.report else ""
        return f"Extraction({self.vector!r}{report}; .vector.save(folder) to keep it)"

    def best_layer(self) -> int | None:
        """The layer with the highest held-out accuracy (ties: the earlier layer)."""
        if not self.report:
            return None
        return max(self.report, key=lambda s: (s.accuracy, s.pair_accuracy, -s.layer)).layer


# --- the one-shot function --------------------------------------------------------------------

def extract_vector(
    model: ModelLike,
    dataset: ContrastDataset,
    *,
    layers=None,
    method: str = "mean_diff",
    read: str = "auto",
    site: str = "hook_resid_post",
    batch_size: int = 16,
    holdout: float = 0.2,
    seed: int = 0,
    chat: bool | None = None,
    progress: bool = False,
) -> Extraction:
    """Read activations for every pair, fit one direction per layer, and report per layer
    how well a direction fitted on (1 - holdout) of the pairs separates the rest.

    ActAdd datasets (`actadd_pair`) give a position-aligned vector instead (see
    `actadd_vector`); `method`, `read` and `holdout` do not apply to them.
    """
    model = as_loaded(model)
    layers = check_layers(model, layers)
    _check_options(dataset, method, read, site, batch_size, holdout)
    settings = {"layers": layers, "site": site, "source": dataset.source, "kind": dataset.kind,
                "n_pairs": len(dataset)}
    if dataset.kind == "actadd":
        pair = dataset.pairs[0]
        vector = actadd_vector(model, pair.positive, pair.negative, layers=layers, site=site)
        return Extraction(vector, ())
    read = resolve_read(dataset, read)
    use_chat = _use_chat(model, dataset, chat)
    acts = read_activations(model, dataset, layers=layers, read=read, site=site,
                            batch_size=batch_size, chat=use_chat, progress=progress)
    directions = {layer: fit_direction(*acts.layer(layer), method=method) for layer in layers}
    settings.update(method=method, read=read, batch_size=batch_size, holdout=holdout, seed=seed, chat=use_chat)
    vector = SteeringVector(directions, site=site, model_id=model.model_id, model_type=model.arch.model_type,
                            method=method, dataset_fingerprint=dataset.fingerprint(), settings=settings)
    return Extraction(vector, held_out_report(acts, vector, method=method, holdout=holdout, seed=seed))


def held_out_report(acts: PairActivations, vector: SteeringVector, *, method: str, holdout: float,
                    seed: int) -> tuple[LayerScore, ...]:
    """Fit on a (1 - holdout) share of the pairs, score separation on the rest, per layer."""
    n = acts.positive.shape[0]
    test = _held_out_indices(n, holdout, seed)
    if not test:
        return ()
    train = [i for i in range(n) if i not in set(test)]
    if method in ("pca_diff", "logistic") and len(train) < 2:
        return ()
    scores = []
    for layer in acts.layers:
        pos, neg = acts.layer(layer)
        direction = fit_direction(pos[train], neg[train], method=method)
        accuracy, pair_accuracy = separation(direction, pos[train], neg[train], pos[test], neg[test])
        scores.append(LayerScore(layer, accuracy, pair_accuracy, float(vector[layer].norm()),
                                 len(train), len(test)))
    return tuple(scores)


def _held_out_indices(n: int, holdout: float, seed: int) -> list[int]:
    n_test = int(round(holdout * n))
    if n_test == 0 or n_test >= n:
        return []
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:n_test].tolist())


# --- directions -------------------------------------------------------------------------------

def fit_direction(positive: Float[Tensor, "n d"], negative: Float[Tensor, "n d"], *,
                  method: str = "mean_diff") -> Float[Tensor, "d"]:
    """One layer's steering direction from paired activations (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if positive.shape != negative.shape or positive.dim() != 2 or positive.shape[0] == 0:
        raise ValueError(f"need matching (n, d) activations with n >= 1, got {tuple(positive.shape)} "
                         f"and {tuple(negative.shape)}")
    diffs = (positive - negative).double()
    mean = diffs.mean(0)
    if method == "mean_diff":
        return mean.float()
    if method == "pca_diff":
        unit = _top_component(diffs - mean)
    elif method == "pca_center":
        unit = _top_component(torch.cat([diffs / 2, -diffs / 2]))  # rows: x - pair midpoint
    else:
        unit = logistic_direction(positive.double(), negative.double())
    if float((diffs @ unit).sum()) < 0:  # positives should project higher
        unit = -unit
    return (unit * (mean @ unit)).float()


def _top_component(rows: Tensor) -> Tensor:
    """Unit vector of the first right singular vector of `rows` (n, d)."""
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    return vh[0]


def logistic_direction(positive: Tensor, negative: Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> Tensor:
    """Unit weight vector of a logistic-regression probe (positives = 1), fitted with L-BFGS
    on features centred and divided by one global scale (so directions keep their meaning)."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    centred = x - x.mean(0)
    scale = centred.pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
    z = centred / scale
    weight = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 * weight @ weight
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w = weight.detach()
    norm = w.norm()
    return w / norm if float(norm) > 0 else w


def separation(direction: Tensor, train_pos: Tensor, train_neg: Tensor, test_pos: Tensor,
               test_neg: Tensor) -> tuple[float, float]:
    """(accuracy, pair accuracy) of held-out activations projected on `direction`; the
    threshold is the midpoint of the projected training class means."""
    norm = direction.norm()
    if float(norm) == 0:
        return 0.5, 0.5
    unit = direction / norm
    threshold = ((train_pos @ unit).mean() + (train_neg @ unit).mean()) / 2
    pos, neg = test_pos @ unit, test_neg @ unit
    accuracy = float(((pos > threshold).sum() + (neg < threshold).sum()) / (len(pos) + len(neg)))
    return accuracy, float((pos > neg).float().mean())


# --- reading activations ----------------------------------------------------------------------

def read_activations(model: ModelLike, dataset: ContrastDataset, *, layers, read: str = "auto",
                     site: str = "hook_resid_post", batch_size: int = 16, chat: bool | None = None,
                     progress: bool = False) -> PairActivations:
    """Activations of every pair's positive and negative text at each layer, read at `read`."""
    model = as_loaded(model)
    layers = check_layers(model, layers)
    read = resolve_read(dataset, read)
    texts = tokenize_dataset(model, dataset, read=read, chat=_use_chat(model, dataset, chat))
    sites = [f"blocks.{layer}.{site}" for layer in layers]
    out = torch.zeros(len(texts), len(layers), model.d_model)  # (2 * pairs, layers, d_model)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i].ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_items(batches, progress, desc="reading activations"):
        cache = capture(model, sites, [list(texts[i].ids) for i in batch], batch_size=len(batch), device="cpu")
        weights = _span_weights([texts[i] for i in batch], cache.input_ids.shape[1])  # (batch, seq)
        for j, name in enumerate(sites):
            out[batch, j] = torch.einsum("bs,bsd->bd", weights, cache[name].float())
    return PairActivations(out[0::2].clone(), out[1::2].clone(), tuple(layers))


def _span_weights(texts: list[TokenizedText], seq: int) -> Tensor:
    weights = torch.zeros(len(texts), seq)
    for row, text in enumerate(texts):
        start, stop = text.span
        weights[row, start:stop] = 1.0 / (stop - start)
    return weights


def tokenize_dataset(model: LoadedModel, dataset: ContrastDataset, *, read: str, chat: bool) -> list[TokenizedText]:
    """Positive and negative texts of every pair, interleaved [pos0, neg0, pos1, ...]."""
    texts = []
    for index, pair in enumerate(dataset.pairs):
        prefix = _prefix(model, pair, chat)
        for completion, letter in zip((pair.positive, pair.negative), pair.ab_letters or (None, None)):
            texts.append(tokenize_completion(model, prefix, completion, read=read, letter=letter,
                                             templated=chat and bool(pair.prompt), where=f"pair {index}"))
    return texts


def _prefix(model: LoadedModel, pair: ContrastPair, chat: bool) -> str:
    from interplab.generation import format_prompt

    if not pair.prompt:
        return ""
    return format_prompt(model, pair.prompt, chat=True) if chat else pair.prompt


def tokenize_completion(model: LoadedModel, prefix: str, completion: str, *, read: str,
                        letter: str | None = None, templated: bool = False, where: str = "") -> TokenizedText:
    """Tokenise prefix + completion and find the span to read."""
    tokenizer = model.require_tokenizer()
    text = prefix + completion
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=bool(tokenizer.is_fast))
    ids = tuple(enc["input_ids"])
    if not ids:
        raise ValueError(f"{where}: the text {text!r} has no tokens")
    check_context(model, len(ids), what=f"{where}: the text" if where else "the text",
                  hint="shorten the pair's prompt or completion")
    first = _first_completion_token(tokenizer, enc, prefix, templated)
    first = min(first, len(ids) - 1)
    if read == "last":
        span = (len(ids) - 1, len(ids))
    elif read == "mean":
        span = (first, len(ids))
    else:  # answer
        if letter is None:
            raise ValueError(f"{where}: read='answer' needs A/B completions like '(A)'")
        index = _letter_token(tokenizer, enc, ids, len(prefix) + completion.index(letter), first)
        span = (index, index + 1)
    return TokenizedText(ids, span)


def _first_completion_token(tokenizer, enc, prefix: str, templated: bool) -> int:
    if "offset_mapping" in enc:
        for index, (start, end) in enumerate(enc["offset_mapping"]):
            if end > len(prefix) and end > start:
                return index
        return len(enc["input_ids"]) - 1
    if not prefix:
        return 0
    return len(tokenizer(prefix, add_special_tokens=not templated)["input_ids"])


def _letter_token(tokenizer, enc, ids, char: int, first: int) -> int:
    if "offset_mapping" in enc:
        for index, (start, end) in enumerate(enc["offset_mapping"]):
            if start <= char < end:
                return index
    for index in range(first, len(ids)):  # slow tokenizers: the first completion token with a letter
        if any(c.isalpha() for c in tokenizer.decode([ids[index]])):
            return index
    return len(ids) - 1


# --- ActAdd -----------------------------------------------------------------------------------

def actadd_vector(model: ModelLike, positive: str, negative: str, *, layers=None, site: str = "hook_resid_post") -> SteeringVector:
    """ActAdd (Turner et al. 2023): h_L(positive) - h_L(negative) at every position, the
    shorter prompt padded with space tokens at the end; added later at the first positions."""
    model = as_loaded(model)
    layers = check_layers(model, layers)
    tokenizer = model.require_tokenizer()
    pos_ids, neg_ids = (tokenizer(t)["input_ids"] for t in (positive, negative))
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    pad = space[0] if len(space) == 1 else tokenizer.pad_token_id
    width = max(len(pos_ids), len(neg_ids))
    ids = [list(x) + [pad] * (width - len(x)) for x in (pos_ids, neg_ids)]
    sites = [f"blocks.{layer}.{site}" for layer in layers]
    cache = capture(model, sites, ids, batch_size=2, device="cpu")
    directions = {layer: (cache[name][0] - cache[name][1]).float() for layer, name in zip(layers, sites)}
    return SteeringVector(directions, site=site, model_id=model.model_id, model_type=model.arch.model_type,
                          method="actadd", dataset_fingerprint=ContrastDataset(
                              (ContrastPair(positive, negative),), kind="actadd").fingerprint(),
                          settings={"positive": positive, "negative": negative, "layers": layers,
                                    "site": site, "n_positions": width})


# --- checks -----------------------------------------------------------------------------------

def check_layers(model: LoadedModel, layers) -> list[int]:
    """Normalise layers (None = all; negatives count from the end) or explain what is valid."""
    return resolve_layers(model, layers)


def resolve_read(dataset: ContrastDataset, read: str) -> str:
    if read not in READS:
        raise ValueError(f"unknown read position {read!r}; use one of {', '.join(READS)}")
    if read == "auto":
        return "answer" if dataset.kind == "ab" else "last"
    if read == "answer":
        for index, pair in enumerate(dataset.pairs):
            if pair.ab_letters is None:
                raise ValueError(f"read='answer' needs A/B completions like '(A)' / '(B)'; pair {index} "
                                 f"has {pair.positive!r} / {pair.negative!r}. Use read='last' or 'mean'.")
    return read


def _check_options(dataset, method, read, site, batch_size, holdout) -> None:
    if not isinstance(dataset, ContrastDataset):
        raise TypeError(f"expected a ContrastDataset (see read_pairs), got {type(dataset).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if site not in STEERABLE_SITES:
        raise ValueError(f"site {site!r} cannot hold a steering vector; use one of {', '.join(STEERABLE_SITES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if method in ("pca_diff", "logistic") and len(dataset) < 2 and dataset.kind != "actadd":
        raise ValueError(f"method {method!r} needs at least 2 pairs; this dataset has {len(dataset)}")
    resolve_read(dataset, read)


def _use_chat(model: LoadedModel, dataset: ContrastDataset, chat: bool | None) -> bool:
    from interplab.generation import has_chat_template

    if not dataset.uses_chat:
        return False
    if chat is None:
        return has_chat_template(model)
    if chat and not has_chat_template(model):
        raise ValueError(f"{model.model_id} has no chat template; pass chat=False")
    return bool(chat)


