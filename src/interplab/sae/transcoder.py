"""Transcoders: sparse dictionaries that map a block's MLP input to its MLP output.

    x   = the MLP's input  (the output of the block's pre-MLP norm: ln2(resid_mid))
    y   = the MLP's output (what the block adds to the residual: hook_mlp_out)
    x_n = s_in·x
    pre = x_n @ W_enc + b_enc
    f   = activation(pre)                 (the SAE families: topk, relu, jumprelu)
    ŷ_n = f @ W_dec + b_dec [+ x_n @ W_skip]
    ŷ   = ŷ_n / s_out

trained on L = ‖s_out·y − ŷ_n‖² + (family sparsity term), the input and output scales chosen so
that E‖s·x‖ = E‖s·y‖ = √d (as for SAEs). Dunefsky, Chlenski & Nanda 2024, "Transcoders find
interpretable LLM feature circuits"; the linear skip term W_skip is that of skip transcoders
(Paulo, Shabalin & Belrose 2025, "Transcoders beat sparse autoencoders for interpretability").

A transcoder is saved as a folder (`transcoder.json` with a format_version, and
`transcoder.safetensors`); a set of transcoders for several layers as a folder of such folders
named layer_<L> with `transcoders.json` listing them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.errors import ArtifactError, UserInputError
from interplab.sae.model import jump_relu, scatter_dense, step_count, threshold_relu, topk_relu

FORMAT_VERSION = 1
TRANSCODER_FAMILIES = ("topk", "relu", "jumprelu")
CONFIG_FILE, WEIGHTS_FILE, SET_FILE = "transcoder.json", "transcoder.safetensors", "transcoders.json"


@dataclass(frozen=True)
class TranscoderConfig:
    """The definition of one transcoder (what is learned lives in its weights)."""

    d_in: int
    """Width of the MLP input (the model's hidden size)."""
    d_out: int
    """Width of the MLP output (the model's hidden size)."""
    d_sae: int
    """Number of latents."""
    layer: int
    """The block whose MLP it replaces."""
    family: str = "topk"
    """'topk' (k largest pre-activations), 'relu' (L1 penalty weighted by decoder norms) or
    'jumprelu' (learned thresholds, L0 penalty): the SAE families of `interplab.sae.model`."""
    k: int | None = 32
    """Active latents per token ('topk' only; None for the others)."""
    skip: bool = False
    """Add a linear skip term x_n @ W_skip (a skip transcoder)."""
    l1_coefficient: float = 5.0
    """'relu' only: λ of the L1 penalty."""
    l0_coefficient: float = 1.0
    """'jumprelu' only: λ of the L0 penalty."""
    jumprelu_bandwidth: float = 0.05
    """'jumprelu' only: width of the straight-through estimator's kernel."""
    model_id: str | None = None
    """The model the transcoder was trained on."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_in", "d_out", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if self.family not in TRANSCODER_FAMILIES:
            problems.append(f"family {self.family!r} is unknown; use one of {list(TRANSCODER_FAMILIES)}")
        elif self.family == "topk" and not (isinstance(self.k, int) and 1 <= self.k <= self.d_sae):
            problems.append(f"'topk' needs k in 1..d_sae={self.d_sae}, got {self.k!r}")
        elif self.family != "topk" and self.k is not None:
            problems.append(f"k has no meaning for {self.family!r}; leave it as None")
        if not isinstance(self.layer, int) or self.layer < 0:
            problems.append(f"layer must be an int >= 0, got {self.layer!r}")
        if problems:
            raise UserInputError("invalid TranscoderConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Transcoder(nn.Module):
    """MLP input -> sparse latents -> MLP output (see the module docstring)."""

    def __init__(self, cfg: TranscoderConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        W_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.1 if cfg.family == "relu" else 1.0)
        W_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator)
        self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=0, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out))
        if cfg.family == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), 0.05))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("output_scale", torch.ones(()))

    def extra_repr(self) -> str:
        return f"layer={self.cfg.layer}, family={self.cfg.family!r}, d_sae={self.cfg.d_sae}, skip={self.cfg.skip}"

    def pre_activations(self, x: Float[Tensor, "*n d_in"]) -> Float[Tensor, "*n d_sae"]:
        self._check(x, self.cfg.d_in, "MLP input")
        return (x.float() * self.input_scale) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """f(pre) at inference."""
        if self.cfg.family == "relu":
            return pre.relu()
        if self.cfg.family == "topk":
            return scatter_dense(*topk_relu(pre, self.cfg.k), self.cfg.d_sae)
        return threshold_relu(pre, self.threshold)

    def encode(self, x: Float[Tensor, "*n d_in"]) -> Float[Tensor, "*n d_sae"]:
        return self.activation(self.pre_activations(x))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Float[Tensor, "*n d_out"]:
        """ŷ from latent activations (and, for a skip transcoder, the MLP input x)."""
        y_n = acts @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x is None:
                raise UserInputError("a skip transcoder's output needs the MLP input x too: decode(acts, x)")
            y_n = y_n + self.skip_term(x)
        return y_n / self.output_scale

    def skip_term(self, x: Tensor) -> Tensor:
        """x_n @ W_skip, in the normalised output space."""
        return (x.float() * self.input_scale) @ self.W_skip

    def forward(self, x: Float[Tensor, "*n d_in"]) -> Float[Tensor, "*n d_out"]:
        return self.decode(self.encode(x), x)

    def loss(self, x: Tensor, y: Tensor, sparsity_scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """The training loss on a batch (normalised squared error + the family's sparsity term)."""
        pre = self.pre_activations(x)
        if self.cfg.family == "jumprelu":
            acts = jump_relu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        else:
            acts = self.activation(pre)
        y_hat_n = self.decode(acts, x) * self.output_scale
        mse = (y.float() * self.output_scale - y_hat_n).pow(2).sum(-1).mean()
        total = mse
        if self.cfg.family == "relu":
            total = total + sparsity_scale * self.cfg.l1_coefficient * (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif self.cfg.family == "jumprelu":
            l0 = step_count(pre, self.threshold, self.cfg.jumprelu_bandwidth).mean()
            total = total + sparsity_scale * self.cfg.l0_coefficient * l0
        return total, {"mse": float(mse.detach()), "l0": float((acts > 0).float().sum(-1).mean())}

    @torch.no_grad()
    def init_from_data_(self, x: Tensor, y: Tensor) -> None:
        """Input/output scales so that E‖s·x‖ = E‖s·y‖ = √d, and b_dec at the mean scaled output."""
        for scale, data in ((self.input_scale, x), (self.output_scale, y)):
            norm = float(data.float().norm(dim=-1).mean())
            if not norm > 0:
                raise UserInputError("cannot set a transcoder's scale: the sample's mean norm is 0")
            scale.fill_(math.sqrt(data.shape[-1]) / norm)
        self.b_dec.copy_((y.float() * self.output_scale).mean(0))

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        if self.cfg.family != "relu":
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.cfg.family == "jumprelu":
            self.threshold.clamp_(min=0.0)

    def _check(self, x: Tensor, width: int, what: str) -> None:
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != width:
            got = x.shape[-1] if isinstance(x, Tensor) and x.dim() else type(x).__name__
            raise UserInputError(f"the transcoder of layer {self.cfg.layer} reads {what} of width {width}, got {got}")


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def save_transcoder(transcoder: Transcoder, path: str | Path) -> Path:
    """One transcoder as a folder: transcoder.json + transcoder.safetensors."""
    from interplab.files import atomic_folder, save_tensors, write_json

    with atomic_folder(path) as tmp:
        write_json(tmp / CONFIG_FILE, {"format_version": FORMAT_VERSION, **transcoder.cfg.to_dict()})
        save_tensors(tmp / WEIGHTS_FILE, {k: v.detach().cpu() for k, v in transcoder.state_dict().items()})
    return Path(path)


def load_transcoder(path: str | Path) -> Transcoder:
    from interplab.files import load_tensors, read_json_object

    path = Path(path)
    data = read_json_object(path / CONFIG_FILE, what="transcoder config")
    if data.pop("format_version", None) != FORMAT_VERSION:
        raise ArtifactError(f"{path / CONFIG_FILE}: not an interplab transcoder (format_version {FORMAT_VERSION})")
    transcoder = Transcoder(TranscoderConfig(**data))
    transcoder.load_state_dict(load_tensors(path / WEIGHTS_FILE, what="transcoder weights"))
    return transcoder.eval()


def save_transcoders(transcoders: dict[int, Transcoder], path: str | Path) -> Path:
    """Transcoders for several layers: a folder of layer_<L> folders and transcoders.json."""
    from interplab.files import atomic_folder, write_json

    with atomic_folder(path) as tmp:
        for layer, transcoder in sorted(transcoders.items()):
            save_transcoder(transcoder, tmp / f"layer_{layer}")
        write_json(tmp / SET_FILE, {"format_version": FORMAT_VERSION, "layers": sorted(transcoders)})
    return Path(path)


def load_transcoders(path: str | Path) -> dict[int, Transcoder]:
    from interplab.files import read_json_object

    path = Path(path)
    data = read_json_object(path / SET_FILE, what="transcoder set")
    return {int(layer): load_transcoder(path / f"layer_{layer}") for layer in data.get("layers", [])}
