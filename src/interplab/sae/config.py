"""What an SAE is: one small frozen dataclass shared by every family.

The config holds only what defines the model (its shape, family, loss
coefficients and where its activations come from). What is learned from data
(weights, the input scale, BatchTopK's threshold) lives in the SAE's state and
its safetensors file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FAMILIES = ("relu", "topk", "batchtopk", "jumprelu")
"""SAE families interplab trains and reads."""

DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Parameter dtypes an SAE may be stored in."""


@dataclass(frozen=True)
class SAEConfig:
    """The definition of one sparse autoencoder.

    Every family computes, on an input ``x`` of width ``d_in``::

        x_n = s * x                                    (input normalisation, s stored with the SAE)
        pre = (x_n - b_dec) @ W_enc + b_enc            (b_dec subtracted only if subtract_decoder_bias)
        f   = activation(pre)                          (family-specific, see `family`)
        x̂   = (f @ W_dec + b_dec) / s

    Build one with keyword arguments; invalid values raise ``ValueError`` here,
    before any weight is allocated.
    """

    d_in: int
    """Width of the activations the SAE reads (the model's hidden size at `site`)."""

    d_sae: int
    """Number of latents (the dictionary size)."""

    family: str = "topk"
    """Activation function and sparsity mechanism:
    'relu' (ReLU + L1 penalty weighted by decoder norms; Anthropic 2023/2024),
    'topk' (keep the k largest pre-activations per token + AuxK; Gao et al. 2024),
    'batchtopk' (keep the k·B largest in a batch of B tokens while training, a learned global
    threshold at inference; Bussmann et al. 2024),
    'jumprelu' (ReLU gated by a learned per-latent threshold + L0 penalty; Rajamanoharan et al. 2024)."""

    k: int | None = None
    """Active latents per token for 'topk' (per-token average for 'batchtopk'); required for
    those two families and must be left as None for the others."""

    l1_coefficient: float = 5.0
    """'relu' only: λ in the penalty λ·Σ_i f_i·‖W_dec[i]‖₂ (Anthropic's April 2024 update uses 5
    with inputs scaled to mean norm √d_in)."""

    l0_coefficient: float = 1.0
    """'jumprelu' only: λ in the penalty λ·Σ_i H(pre_i − θ_i) (the number of active latents)."""

    jumprelu_bandwidth: float = 0.05
    """'jumprelu' only: width ε of the rectangle kernel in the straight-through estimator of the
    threshold gradient (in units of pre-activations, which are O(1) when inputs have mean norm √d_in)."""

    jumprelu_threshold_init: float = 0.05
    """'jumprelu' only: initial value of every latent's threshold θ."""

    auxk_coefficient: float = 1 / 32
    """'topk' and 'batchtopk': weight α of the AuxK loss that revives dead latents (Gao et al. use 1/32)."""

    auxk_k: int | None = None
    """'topk' and 'batchtopk': number of dead latents the AuxK loss uses per token; None means d_in // 2
    (the heuristic of Gao et al., Appendix B.1, as in sparsify and SAELens)."""

    batchtopk_threshold_rate: float = 0.01
    """'batchtopk' only: rate of the running average that sets the inference threshold
    θ ← (1 − r)·θ + r·(smallest activation kept in the batch)."""

    normalize_input: bool = True
    """Scale inputs by a constant s so that E‖s·x‖₂ = √d_in (Anthropic, April 2024 update); s is
    estimated from the first training batches, stored with the SAE, and undone on decode."""

    subtract_decoder_bias: bool = True
    """Subtract b_dec from the input before encoding (Gao et al.; Towards Monosemanticity; SAELens'
    apply_b_dec_to_input). Anthropic's April 2024 ReLU recipe and Gemma Scope's JumpReLU do not."""

    decoder_init_norm: float = 0.1
    """'relu' only: norm of each decoder row at initialisation (Anthropic's April 2024 update); the
    other families keep unit-norm decoder rows throughout training."""

    site: str = ""
    """Where the activations come from, in the TransformerLens vocabulary
    (e.g. 'blocks.6.hook_resid_post'); empty when unknown."""

    model_id: str | None = None
    """The model the SAE was trained on (a Hugging Face id or a local name), if known."""

    dtype: str = "float32"
    """Parameter dtype: one of 'float32', 'float64', 'bfloat16', 'float16'."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid SAEConfig: " + "; ".join(problems))

    @property
    def uses_k(self) -> bool:
        """Whether this family selects a fixed number of latents (TopK, BatchTopK)."""
        return self.family in ("topk", "batchtopk")

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training (all but 'relu')."""
        return self.family != "relu"

    @property
    def resolved_auxk_k(self) -> int:
        """The number of dead latents AuxK uses per token."""
        return self.auxk_k if self.auxk_k is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build a config from `to_dict` output; unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise TypeError(f"SAEConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown SAEConfig field(s) {unknown}; valid fields are {sorted(known)}"
            )
        missing = sorted({"d_in", "d_sae"} - set(data))
        if missing:
            raise ValueError(f"SAEConfig needs {missing}; got fields {sorted(data)}")
        return cls(**data)


def _problems(cfg: SAEConfig) -> list[str]:
    """Everything wrong with `cfg`, each as a sentence that says what to do."""
    problems = []
    for name in ("d_in", "d_sae"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    if problems:
        return problems
    if cfg.family not in FAMILIES:
        problems.append(f"family {cfg.family!r} is unknown; use one of {list(FAMILIES)}")
    elif cfg.uses_k:
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.d_sae:
            problems.append(
                f"family {cfg.family!r} needs k, an int in 1..d_sae={cfg.d_sae}; got k={cfg.k!r}"
            )
    elif cfg.k is not None:
        problems.append(f"k={cfg.k!r} has no meaning for family {cfg.family!r}; leave it as None")
    for name in ("l1_coefficient", "l0_coefficient", "auxk_coefficient", "jumprelu_threshold_init"):
        value = getattr(cfg, name)
        if not _is_finite_number(value) or value < 0:
            problems.append(f"{name} must be a finite number >= 0, got {value!r}")
    for name in ("jumprelu_bandwidth", "decoder_init_norm"):
        value = getattr(cfg, name)
        if not _is_finite_number(value) or value <= 0:
            problems.append(f"{name} must be a finite number > 0, got {value!r}")
    if not _is_finite_number(cfg.batchtopk_threshold_rate) or not 0 < cfg.batchtopk_threshold_rate <= 1:
        problems.append(
            f"batchtopk_threshold_rate must be in (0, 1], got {cfg.batchtopk_threshold_rate!r}"
        )
    if cfg.auxk_k is not None and (isinstance(cfg.auxk_k, bool) or not isinstance(cfg.auxk_k, int) or cfg.auxk_k < 1):
        problems.append(f"auxk_k must be a positive int or None, got {cfg.auxk_k!r}")
    if cfg.dtype not in DTYPES:
        problems.append(f"dtype {cfg.dtype!r} is not supported; use one of {list(DTYPES)}")
    if not isinstance(cfg.site, str):
        problems.append(f"site must be a string such as 'blocks.6.hook_resid_post', got {cfg.site!r}")
    if cfg.model_id is not None and not isinstance(cfg.model_id, str):
        problems.append(f"model_id must be a string or None, got {cfg.model_id!r}")
    return problems


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
