"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit tracing").

From one real forward pass of the prompt, freeze what is not linear: every norm's scale
(1/rms or 1/std) and every attention pattern. What is left is affine in the residual stream
(`frozen.py` has the norm and attention pieces):

    h_0     = the embeddings                                     (a source node per position)
    attn_L  = post_L(o_proj(P_L · v(ln1_L(h_L))))                 (P_L the frozen pattern; post_L the
                                                                  post-attention norm of Gemma 2/3 and
                                                                  OLMo 2, else the identity)
    x_L     = ln2_L(h_L + attn_L)       sequential blocks          (the MLP input)
            = ln2_L(h_L)                parallel blocks (GPT-NeoX: the MLP reads the block input)
    mlp_L   = Σ_f a_f·d_f + b_dec,L/s_out + skip_L(x_L) + e_L      (transcoder features + error)
    h_{L+1} = h_L + attn_L + mlp_L
    logit   = lm_head(ln_f(h_n))                                  (ln_f scale frozen)

where d_f = W_dec[f]/s_out and e_L = (real MLP output) − (transcoder output) is the error node,
so the forward pass reproduces the real one exactly (checked when the model is built, for every
layer's MLP input and the logits). A layer without a transcoder is one error node per position
(its MLP output). What a post-MLP norm does is part of the MLP output the transcoder replaces.
Biases (of norms, attention projections, transcoders) are constant terms, never sources.

Logit soft-capping (Gemma 2): the graph's target is the logit *before* the cap, logit_pre, which
is affine in the sources; the model's logit is cap·tanh(logit_pre/cap), a monotone function of it.

Feature activations a_f are the sources of the graph: the replacement never recomputes them, so
each edge is a direct effect. Supported families: see SUPPORTED; others are refused before any work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import UserInputError
from interplab.graph.frozen import check_close, freeze_norm, frozen_attention
from interplab.models.handle import LoadedModel, as_loaded
from interplab.sae.transcoder import Transcoder

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3_text",
             "gpt2", "gpt_neo", "gpt_neox")
"""Families whose frozen forward is exact (each passes the completeness test on a tiny model)."""

MLPFn = Callable[[int, Tensor], Tensor]
"""(layer, MLP input x (b, seq, d)) -> what the layer's MLP writes (b, seq, d)."""


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
    """Frozen quantities of one prompt's real run and the affine forward built from them."""

    def __init__(self, model, transcoders: dict[int, Transcoder], ids: Int[Tensor, " seq"], *,
                 max_features_per_layer: int | None = None, rtol: float = 1e-3) -> None:
        self.model = model = as_loaded(model)
        _check_supported(model, transcoders, ids)
        self.transcoders, self.ids = transcoders, ids.long()
        self.n_layers, self.seq, self.parallel = model.n_layers, ids.shape[0], model.arch.parallel
        real = _real_run(model, self.ids)
        self.embeddings = real["blocks.0.hook_resid_pre"]  # (seq, d)
        self.patterns = [real[f"blocks.{L}.attn.hook_pattern"] for L in range(self.n_layers)]
        self.ln1, self.post_attn, self.ln2 = [], [], []
        for L in range(self.n_layers):
            self._freeze_layer(L, real)
        last = real[f"blocks.{self.n_layers - 1}.hook_resid_post"]
        self.ln_final = freeze_norm(model.ln_final, last)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.real_logits = _pre_cap_logits(model, last, real["logits"], self.softcap)  # (seq, vocab)
        self.mlp_inputs = [self.ln2[L](real[_mlp_input_site(self, L)]) for L in range(self.n_layers)]
        self.features: dict[int, FeatureSet] = {}
        self.biases, self.errors = [], []
        for L in range(self.n_layers):
            bias, error = self._layer_terms(L, real[f"blocks.{L}.hook_mlp_out"], max_features_per_layer)
            self.biases.append(bias)
            self.errors.append(error)
        self._verify(real, rtol)

    # ---- construction ----------------------------------------------------------------------

    @torch.no_grad()
    def _freeze_layer(self, L: int, real: dict) -> None:
        """Layer L's norms with their scales from the real run; the post-attention norm (if any)
        is frozen on the attention output computed from the real block input."""
        arch, h = self.model.arch, real[f"blocks.{L}.hook_resid_pre"]
        self.ln1.append(freeze_norm(self._module(L, arch.ln1), h))
        post = self._module(L, arch.attn_out) if arch.attn_out != arch.attn else None  # Gemma 2/3, OLMo 2
        self.post_attn.append(freeze_norm(post, self._attention_core(L, h[None])[0]))
        check_close(self._attention(L, h[None])[0], real[f"blocks.{L}.hook_attn_out"], 1e-3,
                    f"the attention output of layer {L}")
        self.ln2.append(freeze_norm(self._module(L, arch.ln2), real[_mlp_input_site(self, L)]))

    def live_norms(self) -> "ReplacementModel":
        """A copy whose norms are the model's own modules (recomputed, not frozen); attention
        patterns stay frozen. Not affine: for intervention checks, never for attribution."""
        live, arch = copy.copy(self), self.model.arch
        live.ln1 = [_callable(self._module(L, arch.ln1)) for L in range(self.n_layers)]
        live.post_attn = [_callable(self._module(L, arch.attn_out) if arch.attn_out != arch.attn else None)
                          for L in range(self.n_layers)]
        live.ln2 = [_callable(self._module(L, arch.ln2)) for L in range(self.n_layers)]
        live.ln_final = self.model.ln_final
        return live

    def _module(self, L: int, path: str | None):
        return None if path is None else self.model.block_module(L, path)

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
        written = torch.zeros_like(mlp_out).index_add_(0, positions, directions) + bias + self.skip(L, x)
        return bias, mlp_out - written

    def skip(self, L: int, x: Tensor) -> Tensor:
        """A skip transcoder's linear term at layer L (zero otherwise)."""
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

    # ---- the affine forward -----------------------------------------------------------------

    def forward(self, embeddings: Float[Tensor, "b seq d"], mlp: MLPFn) -> tuple[list[Tensor], Tensor]:
        """MLP inputs x_L (b, seq, d) of every layer and the final-norm output (b, seq, d), given the
        embeddings and what each layer's MLP writes as a function of its input."""
        h, inputs = embeddings, []
        for L in range(self.n_layers):
            attn = self._attention(L, h)
            x = self.ln2[L](h if self.parallel else h + attn)
            inputs.append(x)
            h = h + attn + mlp(L, x)
        return inputs, self.ln_final(h)

    def node_mlp(self, writes: list[Tensor]) -> MLPFn:
        """The replacement's MLPs: the given node writes (features + error, b × seq × d per layer)
        plus the skip term and the decoder bias."""
        return lambda L, x: writes[L] + self.skip(L, x) + self.biases[L]

    def _attention(self, L: int, h: Tensor) -> Tensor:
        return self.post_attn[L](self._attention_core(L, h))

    def _attention_core(self, L: int, h: Tensor) -> Tensor:
        """o_proj(P · v(ln1(h))): the attention output before any post-attention norm."""
        model = self.model
        attn, o_proj = model.block_module(L, model.arch.attn), model.block_module(L, model.arch.attn_o)
        return frozen_attention(attn, o_proj, self.patterns[L], self.ln1[L](h), model.d_head)

    def logits(self, final: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits before any soft-cap (the graph's targets)."""
        return self.model.unembed(final if positions is None else final[:, positions])

    def _verify(self, real: dict, rtol: float) -> None:
        with torch.no_grad():
            writes = [(self.feature_writes(L) + self.errors[L])[None] for L in range(self.n_layers)]
            inputs, final = self.forward(self.embeddings[None], self.node_mlp(writes))
            logits = self.logits(final)[0]
        for L, x in enumerate(inputs):
            check_close(x[0], self.mlp_inputs[L], rtol, f"the MLP input of layer {L}")
        check_close(logits, self.real_logits, rtol, "the logits")


def _callable(module):
    return (lambda x: x) if module is None else module


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma 2's final logit soft-cap: cap·tanh(logits/cap) (identity without a cap)."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


@torch.no_grad()
def _pre_cap_logits(model: LoadedModel, last: Tensor, logits: Tensor, cap: float | None) -> Tensor:
    """lm_head(ln_f(h_n)) from the real last residual, checked against the model's own logits."""
    pre = model.unembed(model.ln_final(last.to(model.device, model.dtype))).float().cpu()
    check_close(soft_cap(pre, cap), logits, 1e-4, "the logits from the final norm and unembedding")
    return pre


def _mlp_input_site(rm: ReplacementModel, L: int) -> str:
    return f"blocks.{L}.hook_resid_pre" if rm.parallel else f"blocks.{L}.hook_resid_mid"


def _check_supported(model: LoadedModel, transcoders: dict[int, Transcoder], ids: Tensor) -> None:
    kind = model.arch.model_type
    if kind not in SUPPORTED:
        raise UserInputError(f"attribution graphs support {', '.join(SUPPORTED)}; {model.model_id} is {kind!r}")
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
    """Residual stream, attention and MLP outputs, attention patterns and logits of one prompt (float32)."""
    from interplab.cache import capture

    kinds = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_pattern"]
    if not model.arch.parallel:
        kinds.append("hook_resid_mid")
    sites = [f"blocks.{L}.{kind}" for L in range(model.n_layers) for kind in kinds]
    sites.append(f"blocks.{model.n_layers - 1}.hook_resid_post")
    cache = capture(model, sites, ids[None].to(model.device), logits=True, device="cpu", dtype=torch.float32)
    out = {name: cache[name][0] for name in sites}
    out["logits"] = cache.logits[0].float()
    return out
