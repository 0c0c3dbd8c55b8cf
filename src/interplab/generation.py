"""`generate()`: prompts in, continuations out; composes with any `intervene` block."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from interplab.errors import UserInputError
from interplab.models.handle import LoadedModel, as_loaded
from interplab.types import ModelLike
from interplab.tokens import check_context, padding_side


def has_chat_template(model: LoadedModel) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None))


def format_prompt(model: LoadedModel, prompt: str, chat: bool | None = None) -> str:
    """The prompt as the model will see it: wrapped in its chat template when it has one
    (and `chat` is not False), otherwise unchanged."""
    use_chat = has_chat_template(model) if chat is None else chat
    if not use_chat:
        return prompt
    if not has_chat_template(model):
        raise ValueError(f"{model.model_id} has no chat template; pass chat=False")
    tokenizer = model.require_tokenizer()
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate(
    model: ModelLike,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 40,
    chat: bool | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    use_cache: bool = True,
    stream: bool | Callable[[str], None] = False,
    logits_processor=None,
) -> list[str]:
    """Continue each prompt and return only the new text (one string per prompt).

    The chat template is applied when the model has one, unless `chat=False`. `stream=True`
    prints tokens as they come (one prompt only); a callable receives each text chunk.
    Greedy by default; with `do_sample`, `seed` makes runs repeatable. A prompt that, with
    `max_new_tokens`, would run past the model's context window is refused before generating.
    """
    model = as_loaded(model)
    texts = _check_prompts(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokenizer = model.require_tokenizer()
    formatted = [format_prompt(model, text, chat) for text in texts]
    with padding_side(tokenizer, "left"):
        enc = tokenizer(formatted, return_tensors="pt", padding=True,
                        add_special_tokens=not _template_used(model, chat))
    # only ids and mask: transformers 4.x rejects extra tokenizer outputs such as token_type_ids
    check_context(model, enc["input_ids"].shape[1], new_tokens=max_new_tokens, what="the prompts",
                  hint="shorten the prompt or ask for fewer new tokens")
    enc = {k: enc[k].to(model.device) for k in ("input_ids", "attention_mask")}
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
    with torch.no_grad():
        out = model.hf.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id, streamer=_streamer(tokenizer, stream, len(texts)),
            logits_processor=logits_processor, **sampling,
        )
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _check_prompts(prompts) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("no prompts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompt {i} is empty")
    return texts


def _template_used(model: LoadedModel, chat: bool | None) -> bool:
    return has_chat_template(model) if chat is None else bool(chat)


def _streamer(tokenizer, stream, n_prompts: int):
    if not stream:
        return None
    if n_prompts != 1:
        raise ValueError("streaming works with one prompt at a time")
    from transformers import TextStreamer

    if stream is True:
        return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    class _CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                stream(text)

    return _CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
