"""Measure what a steering vector does, and what it costs.

- A/B behaviour score (CAA; Panickssery et al. 2024): for each held-out A/B item the
  prompt is the (chat-formatted) question followed by "(", and the score is
  p(matching letter) / (p(A) + p(B)) at the next token, averaged over items, for every
  (layer, scale) of a sweep. The vector is added from the "(" before the answer letter on
  (positions="caa", after the chat template), as CAA's code does.
- Damage: the rise in next-token cross-entropy on neutral text, and the KL divergence
  KL(p_base || p_steered) averaged over tokens, at each scale, so that behaviour
  change is always reported beside its cost.
- Open-ended: baseline and steered generations side by side, with the same seed.

Results are plain rows (dataclasses) written as CSV and JSON, with PNG plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from interplab import files
from interplab.errors import UserInputError
from interplab.figures import save_png, subplots
from interplab.models.handle import LoadedModel, as_loaded
from interplab.positions import Positions
from interplab.progress import progress as _progress_items
from interplab.scoring import kl_divergence, log_probs, masked_mean, next_token_nll
from interplab.steering.datasets import ContrastDataset
from interplab.steering.vector import CAA_RULES, SteeringVector, caa_positions
from interplab.types import ModelLike

NEUTRAL_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "To make a cup of tea, boil water, pour it over the tea leaves and wait a few minutes.",
    "The committee will meet next Tuesday to discuss the budget for the coming year.",
    "Photosynthesis is the process by which plants turn light, water and carbon dioxide into sugar.",
    "He walked to the station, bought a ticket and waited for the train to arrive.",
    "The museum has a large collection of paintings from the seventeenth century.",
    "Most computers store numbers in binary, using only the digits zero and one.",
    "She wrote a letter to her grandmother and posted it on her way to school.",
)


@dataclass(frozen=True)
class SweepRow:
    """One (layer, scale) cell of an A/B sweep."""

    layer: int
    scale: float
    p_match: float
    """Mean over items of p(matching letter) / (p(A) + p(B))."""
    p_ab: float
    """Mean probability mass on the two letters (low values: the model is not answering)."""
    n_items: int
    """Items averaged."""


@dataclass(frozen=True)
class DamageRow:
    """Cost of steering on neutral text at one (layer, scale)."""

    layer: int
    scale: float
    cross_entropy: float
    """Mean next-token cross-entropy (nats) on the neutral texts, steered."""
    delta_ce: float
    """cross_entropy minus the unsteered model's."""
    kl: float
    """Mean over tokens of KL(p_unsteered || p_steered) (nats)."""


# --- A/B --------------------------------------------------------------------------------------

def ab_sweep(model: ModelLike, vector: SteeringVector, dataset: ContrastDataset, *, layers=None,
             scales: Sequence[float] = (-2, -1, 0, 1, 2), positions="all", chat: bool | None = None,
             batch_size: int = 16, progress: bool = False) -> list[SweepRow]:
    """The A/B score for every layer x scale (scale 0 is computed once)."""
    model = as_loaded(model)
    scales = check_scales(scales)
    layers = vector.layers if layers is None else vector._chosen_layers(model, layers)
    vector.check_model(model)
    prompts = ab_prompts(model, dataset, chat)
    resolved = ab_positions(model, chat, positions) if positions in CAA_RULES else positions
    baseline = None
    rows = []
    cells = [(layer, m) for layer in layers for m in scales]
    for layer, scale in _progress_items(cells, progress, desc="A/B sweep"):
        if scale == 0:
            baseline = baseline or ab_scores(model, prompts, batch_size=batch_size)
            p_match, p_ab = baseline
        else:
            p_match, p_ab = ab_scores(model, prompts, batch_size=batch_size,
                                      steer=(vector, layer, scale, resolved))
        rows.append(SweepRow(layer, scale, p_match, p_ab, len(prompts.texts)))
    return rows


@dataclass(frozen=True)
class ABPrompts:
    """A/B items as the model sees them."""

    texts: list[str]
    """Each question, chat-formatted when `templated`, followed by "("."""
    letters: list[tuple[str, str]]
    """(matching, other) answer letters per item."""
    templated: bool
    """Whether the chat template was applied (then no special tokens are added again)."""


def ab_prompts(model: LoadedModel, dataset: ContrastDataset, chat: bool | None = None) -> ABPrompts:
    """The question of each A/B item formatted as the model sees it, ending in "("."""
    from interplab.generation import format_prompt, has_chat_template

    if not isinstance(dataset, ContrastDataset):
        raise TypeError(f"expected a ContrastDataset of A/B items, got {type(dataset).__name__}")
    texts, letters = [], []
    for index, pair in enumerate(dataset.pairs):
        if pair.ab_letters is None or not pair.prompt:
            raise ValueError(f"item {index} of {dataset.source or 'the dataset'} is not an A/B item: the "
                             f"A/B score needs a question and answers '(A)'/'(B)', got "
                             f"{pair.positive!r} / {pair.negative!r}")
        texts.append(format_prompt(model, pair.prompt, chat) + "(")
        letters.append(pair.ab_letters)
    templated = has_chat_template(model) if chat is None else bool(chat)
    return ABPrompts(texts, letters, templated)


def ab_positions(model: LoadedModel, chat: bool | None = None, rule: str = "caa") -> Positions:
    """Where an A/B prompt is steered: "caa" (default), from the "(" before the answer letter
    on (the first token after the chat template); "caa_tail", from the end of the question on.
    See `interplab.steering.vector.caa_positions`."""
    return caa_positions(model, rule, chat)


def ab_scores(model: LoadedModel, prompts: ABPrompts, *, batch_size: int = 16,
              steer=None) -> tuple[float, float]:
    """(mean normalised p(match), mean p(A) + p(B)), optionally steered by
    steer = (vector, layer, scale, positions)."""
    from interplab.tokens import check_context, padding_side

    tokenizer = model.require_tokenizer()
    letters, texts = prompts.letters, prompts.texts
    letter_ids = {letter: letter_token(model, letter) for pair in letters for letter in pair}
    matched, mass = [], []
    handle = _steer(model, steer)
    try:
        for start in range(0, len(texts), batch_size):
            with padding_side(tokenizer, "left"):
                enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=not prompts.templated)
            check_context(model, enc["input_ids"].shape[1], what="the A/B prompts",
                          hint="use shorter questions")
            if handle is not None:
                handle.new_sequence()  # each batch is a new prompt (prompt length is per batch)
            with torch.no_grad():
                logits = model.hf(input_ids=enc["input_ids"].to(model.device),
                                  attention_mask=enc["attention_mask"].to(model.device), use_cache=False).logits
            probs = logits[:, -1].float().softmax(-1).cpu()  # (batch, vocab)
            for row, (match, other) in enumerate(letters[start:start + batch_size]):
                p_match, p_other = float(probs[row, letter_ids[match]]), float(probs[row, letter_ids[other]])
                matched.append(p_match / max(p_match + p_other, 1e-12))
                mass.append(p_match + p_other)
    finally:
        if handle is not None:
            handle.remove()
    return sum(matched) / len(matched), sum(mass) / len(mass)


def letter_token(model: LoadedModel, letter: str) -> int:
    """The single token id of an answer letter ("A")."""
    tokenizer = model.require_tokenizer()
    ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the answer letter {letter!r} is {len(ids)} tokens for {model.model_id}; the "
                         "A/B score needs single-token letters")
    return ids[0]


def _steer(model, steer):
    if steer is None:
        return None
    vector, layer, scale, positions = steer
    return vector.apply(model, layers=[layer], scale=scale, positions=positions)


# --- damage -----------------------------------------------------------------------------------

def damage(model: ModelLike, vector: SteeringVector, *, layers=None, scales: Sequence[float] = (-2, -1, 0, 1, 2),
           texts: Sequence[str] | None = None, positions="all", batch_size: int = 8,
           progress: bool = False) -> list[DamageRow]:
    """Cross-entropy rise and KL to the unsteered model on neutral text, per layer x scale."""
    model = as_loaded(model)
    scales = check_scales(scales)
    layers = vector.layers if layers is None else vector._chosen_layers(model, layers)
    vector.check_model(model)
    texts = list(NEUTRAL_TEXTS if texts is None else texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("damage() needs at least one non-empty neutral text")
    batches = _text_batches(model, texts, batch_size)
    base = [_log_probs(model, batch) for batch in batches]
    base_ce = _cross_entropy(base, batches)
    rows = []
    for layer, scale in _progress_items([(la, m) for la in layers for m in scales], progress, desc="damage"):
        if scale == 0:
            rows.append(DamageRow(layer, 0.0, base_ce, 0.0, 0.0))
            continue
        with vector.apply(model, layers=[layer], scale=scale, positions=positions) as handle:
            steered = []
            for batch in batches:
                handle.new_sequence()
                steered.append(_log_probs(model, batch))
        ce = _cross_entropy(steered, batches)
        rows.append(DamageRow(layer, scale, ce, ce - base_ce, _kl(base, steered, batches)))
    return rows


def _text_batches(model: LoadedModel, texts: list[str], batch_size: int):
    from interplab.tokens import to_batch

    batch = to_batch(model, texts, side="right")
    return [batch.slice(i, i + batch_size) for i in range(0, len(batch), batch_size)]


def _log_probs(model: LoadedModel, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model.hf(input_ids=batch.input_ids.to(model.device),
                          attention_mask=batch.attention_mask.to(model.device), use_cache=False).logits
    return log_probs(logits).cpu()  # (batch, seq, vocab)


def _cross_entropy(log_p: list[torch.Tensor], batches) -> float:
    """Mean next-token cross-entropy over the real target tokens."""
    total, count = 0.0, 0
    for lp, batch in zip(log_p, batches):
        nll = next_token_nll(lp, batch.input_ids)  # (batch, seq - 1)
        part, n = masked_mean(nll, batch.attention_mask[:, 1:].bool())
        total, count = total + part, count + n
    return total / max(count, 1)


def _kl(base: list[torch.Tensor], steered: list[torch.Tensor], batches) -> float:
    """Mean KL(p_base || p_steered) over every real token's next-token distribution."""
    total, count = 0.0, 0
    for b, s, batch in zip(base, steered, batches):
        part, n = masked_mean(kl_divergence(b, s), batch.attention_mask.bool())  # (batch, seq)
        total, count = total + part, count + n
    return total / max(count, 1)


# --- open-ended -------------------------------------------------------------------------------

def side_by_side(model: ModelLike, vector: SteeringVector, prompts: Sequence[str], *, layer: int,
                 scales: Sequence[float] = (-4.0, 4.0), max_new_tokens: int = 40, seed: int = 0,
                 do_sample: bool = False, positions="all", chat: bool | None = None,
                 norm_preserving: bool = False) -> list[dict]:
    """Baseline and steered continuations of each prompt (same seed), as rows
    {"prompt", "scale", "text"} with scale 0 for the baseline."""
    from interplab.generation import generate

    model = as_loaded(model)
    scales = check_scales(scales)
    rows = []
    for prompt in prompts:
        for scale in [0.0] + [s for s in scales if s != 0]:
            kwargs = dict(max_new_tokens=max_new_tokens, seed=seed, do_sample=do_sample, chat=chat)
            if scale == 0:
                text = generate(model, prompt, **kwargs)[0]
            else:
                with vector.apply(model, layers=[layer], scale=scale, positions=positions,
                                  norm_preserving=norm_preserving):
                    text = generate(model, prompt, **kwargs)[0]
            rows.append({"prompt": prompt, "layer": layer, "scale": scale, "text": text})
    return rows


# --- checks, files, plots ---------------------------------------------------------------------

def check_scales(values) -> list[float]:
    """Finite numbers, or a clear error naming the bad one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise UserInputError(f"scales must be a non-empty list of numbers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"scale {value!r} is not a number")
        if not math.isfinite(float(value)):
            raise UserInputError(f"scale {value!r} is not a finite number")
        out.append(float(value))
    return out


def write_rows(rows: Sequence, folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write dataclass rows as `<name>.csv` and `<name>.json` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dicts = [asdict(r) if not isinstance(r, dict) else r for r in rows]
    files.write_json(folder / f"{name}.json", files.finite_json(dicts))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dicts[0]) if dicts else [])
    writer.writeheader()
    writer.writerows(dicts)
    files.write_text(folder / f"{name}.csv", table.getvalue())
    return folder / f"{name}.csv", folder / f"{name}.json"


def plot_sweep(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "A/B behaviour score") -> Path:
    """Score vs scale, one line per layer."""
    fig, ax = subplots(figsize=(6.5, 4.2))
    for layer in sorted({r.layer for r in rows}):
        mine = sorted((r for r in rows if r.layer == layer), key=lambda r: r.scale)
        ax.plot([r.scale for r in mine], [r.p_match for r in mine], marker="o", label=f"layer {layer}")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="scale", ylabel="p(matching answer), normalised", title=title, ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_heatmap(rows: Sequence[SweepRow], path: str | os.PathLike, *, title: str = "A/B score: layer x scale") -> Path:
    layers = sorted({r.layer for r in rows})
    mults = sorted({r.scale for r in rows})
    grid = torch.full((len(layers), len(mults)), float("nan"))
    for r in rows:
        grid[layers.index(r.layer), mults.index(r.scale)] = r.p_match
    fig, ax = subplots(figsize=(1.0 + 0.7 * len(mults), 1.2 + 0.3 * len(layers)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="RdBu_r", vmin=0, vmax=1)
    ax.set_xticks(range(len(mults)), [f"{m:g}" for m in mults])
    ax.set_yticks(range(len(layers)), [str(la) for la in layers])
    ax.set(xlabel="scale", ylabel="layer", title=title)
    fig.colorbar(image, ax=ax, label="p(match)")
    return _save(fig, path)


def plot_damage(rows: Sequence[DamageRow], path: str | os.PathLike) -> Path:
    fig, (left, right) = subplots(1, 2, figsize=(9, 3.6))
    for layer in sorted({r.layer for r in rows}):
        mine = sorted((r for r in rows if r.layer == layer), key=lambda r: r.scale)
        left.plot([r.scale for r in mine], [r.delta_ce for r in mine], marker="o", label=f"layer {layer}")
        right.plot([r.scale for r in mine], [r.kl for r in mine], marker="o", label=f"layer {layer}")
    left.set(xlabel="scale", ylabel="Δ cross-entropy (nats)", title="damage on neutral text")
    right.set(xlabel="scale", ylabel="KL(base || steered)", title="KL to the unsteered model")
    left.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> Path:
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def sweep_summary(rows: Sequence[SweepRow]) -> dict:
    """Per layer: the score at each scale and whether it moves monotonically with it."""
    out = {}
    for layer in sorted({r.layer for r in rows}):
        mine = sorted((r for r in rows if r.layer == layer), key=lambda r: r.scale)
        scores = [r.p_match for r in mine]
        rising = all(b > a for a, b in zip(scores, scores[1:]))
        out[layer] = {"scales": [r.scale for r in mine], "p_match": scores, "monotonic": rising,
                      "spread": max(scores) - min(scores)}
    return out


def write_json(path: str | os.PathLike, data) -> Path:
    """`data` as JSON (values JSON cannot hold are written as their str())."""
    return files.write_json(path, files.finite_json(json.loads(json.dumps(data, default=str))))
