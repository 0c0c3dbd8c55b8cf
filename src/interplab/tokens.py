"""Turning user inputs (texts or token ids) into padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interplab.errors import UserInputError
from interplab.models.handle import LoadedModel


@dataclass
class Batch:
    """Padded token ids and their mask."""

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    padding_side: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.padding_side)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.padding_side)


@contextmanager
def padding_side(tokenizer, side: str):
    """Temporarily set the tokenizer's padding side."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous


def to_batch(model: LoadedModel, inputs, *, side: str = "right", max_length: int | None = None,
             add_special_tokens: bool = True) -> Batch:
    """Texts, a text, token ids (tensor or lists) or a tokenizer output -> one padded Batch."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Tensor):
        return _from_ids(model, inputs if inputs.dim() == 2 else inputs[None], side)
    if hasattr(inputs, "keys") and "input_ids" in inputs:
        ids = torch.as_tensor(inputs["input_ids"])
        mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids)))
        return Batch(ids, mask, side)
    if not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise ValueError("no inputs: give at least one text or one sequence of token ids")
    if all(isinstance(x, str) for x in inputs):
        return _from_texts(model, list(inputs), side, max_length, add_special_tokens)
    if all(isinstance(x, Sequence) and all(isinstance(t, int) for t in x) for x in inputs):
        return _pad_lists(model, [list(x) for x in inputs], side)
    raise TypeError("inputs must be a text, a list of texts, a tensor of token ids, or lists of ids")


def _from_texts(model, texts, side, max_length, add_special_tokens) -> Batch:
    for i, text in enumerate(texts):
        if not text:
            raise ValueError(f"text {i} is empty; every input needs at least one token")
    tokenizer = model.require_tokenizer()
    with padding_side(tokenizer, side):
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=max_length is not None,
                        max_length=max_length, add_special_tokens=add_special_tokens)
    check_context(model, enc["input_ids"].shape[1])
    return Batch(enc["input_ids"], enc["attention_mask"], side)


def _from_ids(model, ids: Tensor, side: str) -> Batch:
    if ids.numel() == 0:
        raise ValueError("no inputs: the token id tensor is empty")
    _check_vocab(model, ids)
    check_context(model, ids.shape[1])
    return Batch(ids.long(), torch.ones_like(ids, dtype=torch.long), side)


def _pad_lists(model, rows: list[list[int]], side: str) -> Batch:
    if any(len(r) == 0 for r in rows):
        raise ValueError("an input has no tokens")
    width = max(len(r) for r in rows)
    pad = pad_token_id(model)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl], mask[i, sl] = torch.tensor(row), 1
    _check_vocab(model, ids)
    check_context(model, width)
    return Batch(ids, mask, side)


def pad_token_id(model: LoadedModel) -> int:
    tok = model.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                      getattr(model.config, "pad_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, unknown, ...)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def special_token_mask(model: LoadedModel, ids: Int[Tensor, "..."]) -> Bool[Tensor, "..."]:
    """True where `ids` holds one of the model's special tokens (none without a tokenizer).
    The one definition SAE training, evaluation, features and steering skip tokens by."""
    if model.tokenizer is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    special = torch.tensor(sorted(special_token_ids(model.tokenizer)), dtype=ids.dtype, device=ids.device)
    return torch.isin(ids, special)


def _check_vocab(model: LoadedModel, ids: Tensor) -> None:
    if ids.min() < 0 or ids.max() >= model.vocab_size:
        raise ValueError(
            f"token ids must lie in 0..{model.vocab_size - 1} (the model's vocabulary); "
            f"got min {int(ids.min())}, max {int(ids.max())}"
        )


def max_positions(model: LoadedModel) -> int | None:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: LoadedModel, length: int, *, new_tokens: int = 0, what: str = "inputs",
                  hint: str = "shorten them or pass max_length to truncate") -> None:
    """Refuse `length` prompt tokens (plus `new_tokens` to generate) past the model's context
    window, before any work starts. One rule for capture, generate, steering evaluation,
    analysis and SAE harvests."""
    limit = max_positions(model)
    total = length + new_tokens
    if limit is None or total <= limit:
        return
    asked = f"{length} tokens" + (f" + {new_tokens} new tokens = {total}" if new_tokens else "")
    raise UserInputError(f"{what}: {asked}, but {model.model_id} allows at most {limit} positions; "
                         f"{hint}")
