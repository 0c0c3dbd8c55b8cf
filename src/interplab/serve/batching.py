"""The batched generation loop: many requests, one forward pass per step.

Rows are left-padded and share one KV cache; each row keeps its own sampling parameters
(temperature, top_p, a seeded `torch.Generator`), stop strings, token budget, logit biases and
interventions (see `rows.RowTable`), and finishes on its own. A finished or cancelled row is
dropped from the batch and from the cache at the next step, so it costs nothing afterwards.
Position ids follow the attention mask, so a left-padded row sees exactly the positions it
would see alone.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.interventions import intervene
from interplab.models.handle import LoadedModel
from interplab.serve.rows import RowTable
from interplab.tokens import pad_token_id


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Row:
    """One request's generation: its prompt, its edits, and what it produced so far."""

    prompt_ids: list[int]
    sampling: Sampling
    edits: dict = field(default_factory=dict)
    """{Site: [intervention, ...]}: validated library interventions for this row."""
    logit_biases: list = field(default_factory=list)
    """Objects with `apply_to_logits(logits)` (FeatureLogitBias), applied at sampling time."""
    on_text: Callable[[str], None] | None = None
    """Receives each new piece of text as soon as it is final (streaming)."""
    cancelled: bool = False
    """Set from another thread when the client went away; the row is dropped at the next step."""
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _sent: int = 0

    def generator(self) -> torch.Generator:
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
        return torch.Generator().manual_seed(seed)


def run_batch(model: LoadedModel, rows: Sequence[Row]) -> None:
    """Generate every row to its end (stop, length or cancel), in place."""
    rows = [row for row in rows if not row.cancelled]
    if not rows:
        return
    table = RowTable([row.edits for row in rows], [len(row.prompt_ids) for row in rows],
                     [torch.as_tensor(row.prompt_ids) for row in rows])
    handle = intervene(model, table.site_fns()) if table.sites else nullcontext()
    with handle, torch.no_grad():
        _generate(model, rows, table)


def _generate(model: LoadedModel, rows: list[Row], table: RowTable) -> None:
    tokenizer = model.require_tokenizer()
    eos = eos_token_ids(model)
    generators = [row.generator() for row in rows]
    ids, mask = left_pad([row.prompt_ids for row in rows], pad_token_id(model), model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what each row would see alone
    kwargs = _forward_kwargs(model)
    out = model.hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **kwargs["prefill"])
    cache, last_pos = _cache_of(out), positions[:, -1]
    alive = list(range(len(rows)))
    logits = out.logits[:, -1].float()
    while True:
        tokens = [choose_token(logits[i], rows[r], generators[r]) for i, r in enumerate(alive)]
        keep = [i for i, (r, token) in enumerate(zip(alive, tokens))
                if not advance(rows[r], token, eos, tokenizer)]
        if not keep:
            return
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            table.keep(keep)
            alive, tokens = [alive[i] for i in keep], [tokens[i] for i in keep]
        step = torch.tensor(tokens, device=mask.device)[:, None]  # (batch, 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_pos = last_pos + 1
        out = model.hf(input_ids=step, attention_mask=mask, position_ids=last_pos[:, None],
                       use_cache=True, **{kwargs["cache"]: cache})
        cache, logits = _cache_of(out), out.logits[:, -1].float()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """(batch, longest) ids and attention mask, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[b, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def choose_token(logits: Tensor, row: Row, generator: torch.Generator) -> int:
    """The next token for one row: its logit biases, then greedy (temperature 0) or nucleus sampling."""
    for bias in row.logit_biases:
        logits = bias.apply_to_logits(logits)
    s = row.sampling
    if s.temperature == 0:
        return int(logits.argmax())
    probs = (logits / s.temperature).softmax(-1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= s.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def advance(row: Row, token: int, eos: set[int], tokenizer) -> bool:
    """Add `token` to the row, push the text that became final, and say whether the row is done."""
    if row.cancelled:
        row.finish_reason = row.finish_reason or "cancelled"
        return True
    if token in eos:
        return _finish(row, "stop", row.text)
    row.generated.append(token)
    text = tokenizer.decode(row.generated, skip_special_tokens=True)
    cut = _first_stop(text, row.sampling.stop)
    if cut is not None:
        return _finish(row, "stop", text[:cut])
    if len(row.generated) >= row.sampling.max_tokens:
        return _finish(row, "length", text)
    row.text = text
    _emit(row, _settled_length(text, row.sampling.stop))
    return False


def _finish(row: Row, reason: str, text: str) -> bool:
    row.text, row.finish_reason = text, reason
    _emit(row, len(text))
    return True


def _emit(row: Row, upto: int) -> None:
    if upto > row._sent:
        piece, row._sent = row.text[row._sent:upto], upto
        if row.on_text is not None:
            row.on_text(piece)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _settled_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent now: not a half-decoded character, and not a tail that
    could still grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def eos_token_ids(model: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.tokenizer, "eos_token_id", None),
                   getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _forward_kwargs(model: LoadedModel) -> dict:
    """The model's name for the KV cache argument (transformers 5.24 renamed `past_key_values` to
    `cache`), and `logits_to_keep=1` for the prefill where supported (it saves the prefill's
    (batch, seq, vocab) logits)."""
    try:
        params = inspect.signature(model.hf.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "prefill": {"logits_to_keep": 1} if "logits_to_keep" in params else {}}


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
