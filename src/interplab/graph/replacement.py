"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit tracing").

From one real forward pass of the prompt, freeze what is not linear: every norm's scale
1/rms(x) and every attention pattern. What is left is linear in the residual stream:

    h_0     = the embeddings                                         (a source node per position)
    a_L     = ln1_L(h_L)            = w1_L ⊙ h_L · r1_L              (r1_L frozen)
    attn_L  = o_proj(P_L · v_proj(a_L))                               (P_L the frozen pattern)
    m_L     = h_L + attn_L
    x_L     = ln2_L(m_L)            = w2_L ⊙ m_L · r2_L               (the MLP input)
    mlp_L   = Σ_f a_f·d_f + b_dec,L/s_out + skip_L(x_L) + e_L          (transcoder features + error)
    h_{L+1} = m_L + mlp_L
    logits  = lm_head(ln_f(h_n))                                      (ln_f scale frozen)

where d_f = W_dec[f]/s_out and e_L = (real MLP output) − (transcoder output) is the error node,
so the forward pass reproduces the real one exactly (checked when the model is built, for
every layer's attention output, MLP input and the logits). A layer without a transcoder is one
error node per position (its MLP output). Feature activations a_f are the sources of the graph:
the replacement never recomputes them, so each edge is a direct effect.

Only sequential blocks with RMS norms and separate v/o projections (the Llama family: llama,
mistral, qwen2, qwen3) are supported; other models are refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import UserInputError
from interplab.models.handle import LoadedModel, as_loaded
from interplab.sae.transcoder import Transcoder

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class FeatureSet:
    """The active features of one layer that are graph nodes."""

    positions: Int[Tensor, " n"]
    """Token position of each feature node."""
    features: Int[Tensor, " n"]
    """Latent id of each feature node."""
    activations: Float[Tensor, " n"]
    """Its activation a_f in the real run."""
    directions: Float[Tensor, "n d"]
    """a_f·d_f: what it writes into the residual stream."""


class ReplacementModel:
    """Frozen quantities of one prompt's real run and the linear forward built from them."""

    def __init__(self, model, transcoders: dict[int, Transcoder], ids: Int[Tensor, " seq"], *,
                 max_features_per_layer: int | None = None, rtol: float = 1e-3) -> None:
        self.model = model = as_loaded(model)
        _check_supported(model, transcoders, ids)
        self.transcoders, self.ids = transcoders, ids.long()
        self.n_layers, self.seq = model.n_layers, ids.shape[0]
        real = _real_run(model, self.ids)
        self.embeddings = real["blocks.0.hook_resid_pre"]  # (seq, d)
        self.patterns = [real[f"blocks.{L}.attn.hook_pattern"] for L in range(self.n_layers)]
        self.ln1 = [_frozen_norm(model.block_module(L, model.arch.ln1), real[f"blocks.{L}.hook_resid_pre"])
                    for L in range(self.n_layers)]
        self.ln2 = [_frozen_norm(model.block_module(L, model.arch.ln2), real[f"blocks.{L}.hook_resid_mid"])
                    for L in range(self.n_layers)]
        self.ln_final = _frozen_norm(model.ln_final, real[f"blocks.{self.n_layers - 1}.hook_resid_post"])
        self.real_logits = real["logits"]  # (seq, vocab)
        self.mlp_inputs = [self.ln2[L](real[f"blocks.{L}.hook_resid_mid"]) for L in range(self.n_layers)]
        self.features: dict[int, FeatureSet] = {}
        self.biases, self.errors = [], []
        for L in range(self.n_layers):
            bias, error = self._layer_terms(L, real[f"blocks.{L}.hook_mlp_out"], max_features_per_layer)
            self.biases.append(bias)
            self.errors.append(error)
        self._verify(real, rtol)

    # ---- construction ----------------------------------------------------------------------

    @torch.no_grad()
    def _layer_terms(self, L: int, mlp_out: Tensor, cap: int | None) -> tuple[Tensor, Tensor]:
        """The constant part of a layer's MLP output and its error node; records its features."""
        transcoder = self.transcoders.get(L)
        if transcoder is None:
            return torch.zeros_like(mlp_out[0]), mlp_out.clone()
        x = self.mlp_inputs[L]
        acts = transcoder.encode(x)  # (seq, d_sae)
        positions, features = acts.nonzero(as_tuple=True)
        values = acts[positions, features]
        if cap is not None and len(values) > cap:
            keep = values.topk(cap).indices.sort().values
            positions, features, values = positions[keep], features[keep], values[keep]
        directions = values[:, None] * transcoder.W_dec[features] / transcoder.output_scale  # (n, d)
        self.features[L] = FeatureSet(positions, features, values, directions)
        bias = transcoder.b_dec / transcoder.output_scale
        written = torch.zeros_like(mlp_out).index_add_(0, positions, directions) + bias + self._skip(L, x)
        return bias, mlp_out - written

    def _skip(self, L: int, x: Tensor) -> Tensor:
        transcoder = self.transcoders.get(L)
        if transcoder is None or not transcoder.cfg.skip:
            return torch.zeros_like(x)
        return transcoder.skip_term(x) / transcoder.output_scale

    def feature_writes(self, L: int) -> Float[Tensor, "seq d"]:
        """Σ of a layer's feature-node writes per position."""
        out = torch.zeros_like(self.errors[L])
        if L in self.features:
            fs = self.features[L]
            out.index_add_(0, fs.positions, fs.directions)
        return out

    # ---- the linear forward -----------------------------------------------------------------

    def forward(self, embeddings: Float[Tensor, "b seq d"], writes: list[Tensor], *, with_bias: bool = True
                ) -> tuple[list[Tensor], Tensor]:
        """MLP inputs x_L (b, seq, d) of every layer and the final-norm output (b, seq, d), given
        the embeddings and each layer's node writes (features + error, b × seq × d)."""
        h, inputs = embeddings, []
        for L in range(self.n_layers):
            m = h + self._attention(L, self.ln1[L](h))
            x = self.ln2[L](m)
            inputs.append(x)
            mlp = writes[L] + self._skip(L, x)
            h = m + mlp + (self.biases[L] if with_bias else 0)
        return inputs, self.ln_final(h)

    def _attention(self, L: int, a: Tensor) -> Tensor:
        attn = self.model.block_module(L, self.model.arch.attn)
        b, seq, _ = a.shape
        pattern = self.patterns[L]  # (heads, q, k)
        n_heads = pattern.shape[0]
        v = attn.v_proj(a).view(b, seq, -1, self.model.d_head).transpose(1, 2)  # (b, kv_heads, seq, d_head)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)  # (b, heads, seq, d_head)
        z = (pattern @ v).transpose(1, 2).reshape(b, seq, -1)  # (b, seq, heads * d_head)
        return attn.o_proj(z)

    def logits(self, final: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.model.unembed(final if positions is None else final[:, positions])

    def _verify(self, real: dict, rtol: float) -> None:
        with torch.no_grad():
            writes = [(self.feature_writes(L) + self.errors[L])[None] for L in range(self.n_layers)]
            inputs, final = self.forward(self.embeddings[None], writes)
            logits = self.logits(final)[0]
        for L, x in enumerate(inputs):
            _close(x[0], self.mlp_inputs[L], rtol, f"the MLP input of layer {L}")
        _close(logits, self.real_logits, rtol, "the logits")


def _close(got: Tensor, want: Tensor, rtol: float, what: str) -> None:
    scale = float(want.abs().max()) or 1.0
    error = float((got - want).abs().max()) / scale
    if error > rtol:
        raise RuntimeError(f"the replacement model does not reproduce {what} of the real run (relative error "
                           f"{error:.2e} > {rtol:.0e}); this architecture computes something the frozen "
                           "linear forward does not model")


class _FrozenRMSNorm:
    """x ↦ w ⊙ x · r with r = 1/√(mean(x_real²) + ε) frozen from the real run."""

    def __init__(self, module, real: Tensor) -> None:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or not hasattr(module, "weight"):
            raise UserInputError(f"attribution graphs need RMS norms with a weight and an epsilon; got {type(module).__name__}")
        self.weight = module.weight.detach().float()
        self.scale = torch.rsqrt(real.float().pow(2).mean(-1, keepdim=True) + eps)  # (seq, 1)
        with torch.no_grad():
            _close(self(real), module(real).float(), 1e-4, f"the norm {type(module).__name__}")

    def __call__(self, x: Tensor) -> Tensor:
        return self.weight * (x * self.scale)


def _frozen_norm(module, real: Tensor) -> _FrozenRMSNorm:
    return _FrozenRMSNorm(module, real)


def _check_supported(model: LoadedModel, transcoders: dict[int, Transcoder], ids: Tensor) -> None:
    kind = model.arch.model_type
    if kind not in SUPPORTED or model.arch.parallel:
        raise UserInputError(f"attribution graphs support the Llama family ({', '.join(SUPPORTED)}); "
                             f"{model.model_id} is {kind!r}")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.shape[0] < 1:
        raise UserInputError("the prompt must be a 1-D tensor of token ids (one prompt, no batch)")
    for layer, transcoder in transcoders.items():
        if not 0 <= layer < model.n_layers:
            raise UserInputError(f"a transcoder is given for layer {layer} but {model.model_id} has "
                                 f"{model.n_layers} blocks (0..{model.n_layers - 1})")
        if transcoder.cfg.d_in != model.d_model or transcoder.cfg.layer != layer:
            raise UserInputError(f"the transcoder given for layer {layer} was made for layer {transcoder.cfg.layer} "
                                 f"with d_in={transcoder.cfg.d_in}; this model has d_model={model.d_model}")


@torch.no_grad()
def _real_run(model: LoadedModel, ids: Tensor) -> dict[str, Tensor]:
    """Residual stream, MLP outputs, attention patterns and logits of one prompt (float32)."""
    from interplab.cache import capture

    sites = [f"blocks.{L}.{kind}" for L in range(model.n_layers)
             for kind in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "attn.hook_pattern")]
    sites.append(f"blocks.{model.n_layers - 1}.hook_resid_post")
    cache = capture(model, sites, ids[None].to(model.device), logits=True, device="cpu", dtype=torch.float32)
    out = {name: cache[name][0] for name in sites}
    out["logits"] = cache.logits[0].float()
    return out
