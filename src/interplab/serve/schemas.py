"""Request bodies in OpenAI's shapes (pydantic), plus interplab's `steering` extra, and errors
in OpenAI's `{"error": {message, type, param, code}}` shape."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, stream_options, ...): accept and ignore them
    model_config = ConfigDict(extra="ignore")


class _Edit(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VectorEdit(_Edit):
    """Add a steering vector (a registered name, or raw floats of the model's width)."""

    vector: Union[str, list[float]]
    layers: list[int] | None = None
    """Block indices; default: every layer of a registered vector (required for raw floats)."""
    scale: float = 1.0
    positions: Union[Literal["all", "prompt", "generated", "caa"], dict[Literal["from"], int]] = "all"


class FeatureEdit(_Edit):
    """Steer with an SAE latent: add its decoder direction, clamp it, ablate it, or bias the logits."""

    sae: str
    feature: int
    mode: Literal["add", "clamp", "ablate", "logit_bias"]
    value: float = 0.0
    """Latent units for add/clamp, nats for logit_bias; ignored for ablate."""
    positions: Union[Literal["all", "prompt", "generated", "caa"], dict[Literal["from"], int]] = "all"


Edit = Union[VectorEdit, FeatureEdit]


class GenerationRequest(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = 1
    steering: list[Edit] = Field(default_factory=list)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: Union[str, list[str]]
    echo: bool = False


class VectorUpload(BaseModel):
    """A steering vector as JSON values: {layer: [floats]}."""

    model_config = ConfigDict(extra="forbid")
    name: str
    directions: dict[int, list[float]] = Field(min_length=1)
    site: str = "hook_resid_post"
    overwrite: bool = False


class LensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    layer: int = 0
    head: int = 0
    top_k: int = Field(default=3, ge=1, le=20)


class ABRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    steering: list[Edit] = Field(min_length=1)
    n_pairs: int = Field(default=16, ge=1, le=200)


class GraphRequest(BaseModel):
    """An attribution graph of one prompt's last position (interplab.graph), pruned by influence."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    transcoders: str | None = None
    """The transcoder set (default: the only one)."""
    target: Union[int, str, None] = None
    """The target token (a single-token string or an id); default: the model's top prediction."""
    node_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    edge_threshold: float = Field(default=0.98, gt=0.0, le=1.0)
    max_features_per_layer: int | None = Field(default=None, ge=1)
    """Keep the most active features per layer (default and maximum: the server's --graph-max-features)."""
