"""What every route shares: the model, the engine, the registries and the limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from interplab.models.handle import LoadedModel
from interplab.serve.engine import Engine
from interplab.serve.registry import SAERegistry, TranscoderRegistry, VectorRegistry
from interplab.serve.schemas import APIError
from interplab.tokens import max_positions


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512
    """Most tokens one request may generate (--max-tokens)."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens (--max-prompt-tokens)."""
    max_body: int = 8 * 1024 * 1024
    """Largest request body in bytes (uploads included)."""
    max_graph_tokens: int = 64
    """Longest prompt an attribution graph is built for, in tokens (--graph-max-tokens)."""
    max_graph_features: int = 256
    """Most feature nodes per layer in a graph, the most active kept (--graph-max-features); the
    others go into the layer's error nodes, so the graph stays exact."""


@dataclass
class ServerState:
    model: LoadedModel
    engine: Engine
    vectors: VectorRegistry
    saes: SAERegistry
    limits: Limits = field(default_factory=Limits)
    model_name: str = ""
    api_key: str | None = None
    datasets: dict = field(default_factory=dict)
    """Contrast sets for the playground's A/B numbers: name -> path of a CAA / pairs file."""
    started: int = field(default_factory=lambda: int(time.time()))
    transcoders: TranscoderRegistry = field(default_factory=TranscoderRegistry)
    """Transcoder sets for attribution graphs."""

    def __post_init__(self) -> None:
        self.model_name = self.model_name or self.model.model_id

    @property
    def window(self) -> int | None:
        return max_positions(self.model)

    def chat_ids(self, messages: list[tuple[str, str]]) -> list[int]:
        """Token ids of a conversation: the model's chat template, or (a base model) the messages'
        texts joined by newlines."""
        tokenizer = self.model.require_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(c for _, c in messages if c))["input_ids"]
        return self._checked(ids, "messages")

    def completion_ids(self, prompt: str, param: str = "prompt") -> list[int]:
        ids = self.model.require_tokenizer()(prompt)["input_ids"]
        return self._checked(ids, param)

    def _checked(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most "
                                f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                           code="context_length_exceeded")
        return ids

    def token_budget(self, prompt_len: int, requested: int | None) -> int:
        """max_tokens for one row: as asked (default: what is left of the cap and the window), or a 400."""
        cap = self.limits.max_tokens
        if requested is not None and requested > cap:
            raise APIError(400, f"max_tokens={requested} is more than this server allows ({cap}, --max-tokens)",
                           param="max_tokens", code="max_tokens_too_large")
        window = self.window
        room = cap if window is None else min(cap, window - prompt_len)
        if requested is None:
            requested = room
        if window is not None and prompt_len + requested > window:
            raise APIError(400, f"this model's context window is {window} tokens, but the prompt has {prompt_len} "
                                f"and max_tokens asks for {requested} more ({prompt_len + requested}); shorten the "
                                "prompt or lower max_tokens", param="max_tokens", code="context_length_exceeded")
        if requested < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the context window ({window})",
                           param="messages", code="context_length_exceeded")
        return requested
