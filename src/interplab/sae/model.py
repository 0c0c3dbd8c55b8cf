"""The sparse autoencoder: one module, with each family's activation as a small function.

Every family shares one computation (``s`` is the stored input scale, see `SAEConfig`)::

    x_n = s·x
    pre = (x_n − b_dec) @ W_enc + b_enc          (− b_dec only if cfg.subtract_decoder_bias)
    f   = activation(pre)
    x̂_n = f @ W_dec + b_dec,   x̂ = x̂_n / s

and is trained on  L = ‖x_n − x̂_n‖² + (family term), averaged over tokens and computed in the
normalised space, so coefficients do not depend on the activations' scale.

Families and their sources:

- ``relu``: f = ReLU(pre); L_sparsity = λ₁·Σᵢ fᵢ·‖W_dec[i]‖₂.  Bricken et al. 2023, "Towards
  Monosemanticity"; Anthropic, "Circuits Updates – April 2024" (decoder-norm-weighted L1, decoder
  rows initialised at norm 0.1 with W_enc = W_decᵀ, inputs scaled to E‖x‖ = √d_in).
- ``topk``: f = ReLU(TopK_k(pre)); L_aux = α·‖e − W_decᵀ z‖² with e = x_n − x̂_n (no gradient) and
  z the k_aux largest pre-activations among dead latents.  Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders" (unit-norm decoder rows, gradient parallel to them removed).
  As in SAELens, z uses raw pre-activations (no ReLU) so latents whose pre-activations are all
  negative still receive a gradient; the loss is scaled by min(n_dead / k_aux, 1) as in sparsify.
- ``batchtopk``: while training, keep the k·B largest ReLU(pre) in a batch of B tokens; at
  inference f = ReLU(pre)·H(pre − θ) with one global θ, a running average of the smallest kept
  activation.  Bussmann et al. 2024, "BatchTopK Sparse Autoencoders".
- ``jumprelu``: f = ReLU(pre)·H(pre − θ) with a learned θ per latent and
  L_sparsity = λ₀·Σᵢ H(preᵢ − θᵢ).  Rajamanoharan et al. 2024, "Jumping Ahead: Improving
  Reconstruction Fidelity with JumpReLU Sparse Autoencoders": straight-through estimates with the
  rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε:
  ∂/∂θ JumpReLU_θ(z) := −(θ/ε)·K((z − θ)/ε),  ∂/∂θ H(z − θ) := −(1/ε)·K((z − θ)/ε),
  and no gradient from the L0 term to z.  θ is a plain parameter kept ≥ 0 (as in SAELens, rather
  than the paper's log θ, which Adam moves too slowly), and unit-norm decoder rows (Gemma Scope).
  The ReLU makes the definition identical to SAELens' JumpReLUSAE for any θ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab.sae.config import SAEConfig

B_DEC_INITS = ("geometric_median", "mean", "zeros")
"""Ways to initialise the decoder bias from data."""


# --------------------------------------------------------------------------------------------
# Family activation functions
# --------------------------------------------------------------------------------------------


def topk_relu(
    pre: Float[Tensor, "*batch d_sae"], k: int
) -> tuple[Float[Tensor, "*batch k"], Int[Tensor, "*batch k"]]:
    """The k largest pre-activations of each token, passed through ReLU, and their latent ids."""
    top = pre.topk(k, dim=-1, sorted=False)
    return top.values.relu(), top.indices


def batch_topk_relu(pre: Float[Tensor, "batch d_sae"], k: int) -> Float[Tensor, "batch d_sae"]:
    """Keep the k·batch largest values of ReLU(pre) over the whole batch, zero the rest."""
    acts = pre.relu()
    flat = acts.flatten()  # (batch * d_sae,)
    top = flat.topk(k * pre.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)


def threshold_relu(pre: Float[Tensor, "*batch d_sae"], threshold: Tensor) -> Float[Tensor, "*batch d_sae"]:
    """ReLU(pre)·H(pre − θ): the inference form of JumpReLU and BatchTopK."""
    return pre.relu() * (pre > threshold)


def scatter_dense(
    values: Float[Tensor, "*batch k"], indices: Int[Tensor, "*batch k"], d_sae: int
) -> Float[Tensor, "*batch d_sae"]:
    """Dense latent activations from (values, latent ids)."""
    dense = values.new_zeros(*values.shape[:-1], d_sae)
    return dense.scatter(-1, indices, values)


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[−½ < u < ½]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """ReLU(z)·H(z − θ) with the straight-through threshold gradient of Rajamanoharan et al."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return threshold_relu(pre, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * ((pre > threshold) & (pre > 0))
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(z − θ), with a gradient to θ only: ∂/∂θ := −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, grad_threshold.reshape(-1, pre.shape[-1]).sum(0), None


def jump_relu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU_θ(pre) = ReLU(pre)·H(pre − θ), differentiable in θ through the STE."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step_count(pre: Tensor, threshold: Tensor, bandwidth: float) -> Float[Tensor, "*batch"]:
    """Σᵢ H(preᵢ − θᵢ) per token (the L0 norm), differentiable in θ through the STE."""
    return _Step.apply(pre, threshold, bandwidth).sum(-1)


# --------------------------------------------------------------------------------------------
# Sparse kernels for TopK training on CPU (tested against the dense path with assert_close)
# --------------------------------------------------------------------------------------------


def _scatter_rows(
    indices: Int[Tensor, "batch k"], weights: Float[Tensor, "batch k"], rows: Float[Tensor, "batch d"], n_rows: int,
    *, dense: bool | None = None,
) -> Float[Tensor, "n_rows d"]:
    """out[i] = Σ_{b,j: indices[b,j] = i} weights[b,j]·rows[b], as one sparse (n_rows×batch) @ (batch×d).

    On CUDA (dense=None picks it there) the weights are scattered into a dense (batch, n_rows)
    matrix and multiplied instead: a sparse COO product coalesces its indices, which makes the
    device report a size to the host on every call, and the training loop must not wait for that."""
    batch, k = indices.shape
    if dense if dense is not None else indices.is_cuda:
        scattered = weights.new_zeros(batch, n_rows).scatter_(1, indices, weights)  # (batch, n_rows)
        return scattered.T @ rows
    token = torch.arange(batch, device=indices.device).repeat_interleave(k)  # (batch*k,)
    coo = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), token]), weights.reshape(-1), (n_rows, batch),
        check_invariants=False,
    )
    return torch.sparse.mm(coo, rows)


def _gather_dot(
    indices: Int[Tensor, "batch k"], table: Float[Tensor, "n d"], rows: Float[Tensor, "batch d"]
) -> Float[Tensor, "batch k"]:
    """out[b, j] = table[indices[b, j]] · rows[b], as a sampled dense-dense product."""
    batch, k = indices.shape
    crow = torch.arange(0, batch * k + 1, k, device=indices.device)  # k entries per row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, indices.reshape(-1), rows.new_zeros(batch * k), (batch, table.shape[0])
        )
        sampled = torch.sparse.sampled_addmm(pattern, rows, table.T, beta=0.0)
    return sampled.values().reshape(batch, k)


class _SelectedPreActs(torch.autograd.Function):
    """pre[b, j] = x_c[b] · W_enc[:, idx[b, j]] + b_enc[idx[b, j]], read from a dense
    pre-activation matrix computed without autograd; the backward pass touches only the
    selected entries (O(batch·k·d_in) instead of O(batch·d_sae·d_in))."""

    @staticmethod
    def forward(ctx, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x_c, W_enc, indices)
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_c, W_enc, indices = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = _scatter_rows(indices, grad, x_c, d_sae).t()  # (d_sae, d_in) -> (d_in, d_sae)
        if ctx.needs_input_grad[2]:
            grad_b = grad.new_zeros(d_sae).index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values[b, j]·W_dec[indices[b, j]] without materialising the dense code."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = _gather_dot(indices, W_dec, grad) if ctx.needs_input_grad[0] else None
        grad_w = _scatter_rows(indices, values, grad, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_w


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEOutput:
    """What `SAE.forward` returns: the reconstruction, the code and the (weighted) loss terms."""

    reconstruction: Float[Tensor, "batch d_in"]
    """x̂ in the input's own (un-normalised) space."""

    latent_acts: Tensor
    """(batch, d_sae) dense activations, or (batch, k) values at `latent_indices` (TopK fast path)."""

    latent_indices: Int[Tensor, "batch k"] | None
    """Latent ids of `latent_acts` when the code is sparse, else None."""

    losses: dict[str, Tensor]
    """Weighted loss terms: 'mse' always; 'l1' (relu), 'l0' (jumprelu), 'auxk' (topk/batchtopk, when
    latents are dead)."""

    d_sae: int
    """Number of latents."""

    @property
    def loss(self) -> Tensor:
        """The training objective: the sum of `losses`."""
        return sum(self.losses.values())  # type: ignore[return-value]

    def feature_acts(self) -> Float[Tensor, "batch d_sae"]:
        """Dense latent activations (materialised from the sparse code if needed)."""
        if self.latent_indices is None:
            return self.latent_acts
        return scatter_dense(self.latent_acts, self.latent_indices, self.d_sae)

    def l0(self) -> Float[Tensor, " batch"]:
        """Number of active (non-zero) latents per token."""
        return (self.latent_acts != 0).sum(-1).to(torch.float32)

    def fired(self) -> Bool[Tensor, " d_sae"]:
        """Which latents were active on at least one token of the batch."""
        if self.latent_indices is None:
            return (self.latent_acts != 0).any(0)
        counts = torch.zeros(self.d_sae, dtype=torch.int64, device=self.latent_acts.device)
        counts.scatter_add_(0, self.latent_indices.reshape(-1), (self.latent_acts != 0).reshape(-1).long())
        return counts > 0


class SAE(nn.Module):
    """A sparse autoencoder of any family (see the module docstring for the formulas).

    Parameters (SAELens shapes): W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in),
    b_dec (d_in); 'jumprelu' adds a parameter threshold (d_sae); 'batchtopk' a buffer threshold ().
    The buffer input_scale () is s, the input normalisation factor.

    >>> sae = SAE(SAEConfig(d_in=576, d_sae=4608, family="topk", k=32))
    >>> f = sae.encode(x)            # (..., 4608), at most 32 non-zeros per token
    >>> x_hat = sae.decode(f)        # (..., 576)
    """

    def __init__(self, cfg: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE needs an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        directions = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)  # unit rows
        W_dec = directions * (cfg.decoder_init_norm if cfg.family == "relu" else 1.0)
        self.W_enc = nn.Parameter(W_dec.T.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.family == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_threshold_init, dtype=dtype))
        elif cfg.family == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        self.use_sparse_kernels = True
        """Use the sparse TopK training kernels on CPU and CUDA (False: the dense reference path)."""

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.uses_k else ""
        site = f", site={self.cfg.site!r}" if self.cfg.site else ""
        return f"family={self.cfg.family!r}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}{k}{site}"

    # ---- inference -------------------------------------------------------------------------

    def pre_activations(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """pre = (s·x − b_dec) @ W_enc + b_enc."""
        self._check_input(x)
        return self._center(self._normalize(x)) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Latent activations f(x), dense (zeros for inactive latents); BatchTopK uses its threshold."""
        pre = self.pre_activations(x)
        family = self.cfg.family
        if family == "relu":
            return pre.relu()
        if family == "topk":
            return scatter_dense(*topk_relu(pre, self.cfg.k), self.cfg.d_sae)
        return threshold_relu(pre, self.threshold)

    def decode(self, acts: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
        """x̂ = (f @ W_dec + b_dec) / s."""
        if not isinstance(acts, Tensor) or acts.shape[-1] != self.cfg.d_sae:
            width = acts.shape[-1] if isinstance(acts, Tensor) and acts.dim() else None
            raise ValueError(f"decode expects latent activations of width d_sae={self.cfg.d_sae}, got {width}")
        return self._denormalize(acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec)

    # ---- training --------------------------------------------------------------------------

    def forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
        sparsity_scale: float = 1.0,
        host_sync: bool = True,
    ) -> SAEOutput:
        """Reconstruct a batch and return the loss terms.

        dead_mask: latents considered dead (for TopK/BatchTopK's AuxK loss).
        sparsity_scale: factor in [0, 1] on the L1/L0 coefficient (the training warm-up).
        host_sync: False never reads a tensor back to the host (the GPU training loop): AuxK is
            then computed whenever dead_mask is given, over a fixed min(k_aux, d_sae) candidates
            with the live ones masked out, which gives the same loss (0 when nothing is dead).

        Under `torch.autocast` the encoder matmul runs in the autocast dtype; the sparse TopK
        path keeps everything after it (gathers, decoder, losses) in the parameters' dtype.
        """
        self._check_input(x)
        if x.dim() != 2:
            raise ValueError(
                f"forward expects a (batch, d_in) matrix, got shape {tuple(x.shape)}; "
                "flatten leading dimensions with x.reshape(-1, d_in)"
            )
        if dead_mask is not None and (tuple(dead_mask.shape) != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool):
            raise ValueError(
                f"dead_mask must be a bool tensor of shape ({self.cfg.d_sae},), "
                f"got {dead_mask.dtype} of shape {tuple(dead_mask.shape)}"
            )
        x_n = self._normalize(x)
        x_c = self._center(x_n)
        aux = _AuxK(self.cfg, dead_mask, host_sync) if self._auxk_active(dead_mask, host_sync) else None
        if self._sparse_path(x_c):
            return self._forward_topk_sparse(x_n, x_c, aux)
        return self._forward_dense(x_n, x_c, aux, sparsity_scale)

    def _forward_dense(self, x_n: Tensor, x_c: Tensor, aux: _AuxK | None, sparsity_scale: float) -> SAEOutput:
        pre = torch.addmm(self.b_enc, x_c, self.W_enc)
        acts = self._train_activation(pre)
        recon_n = acts @ self.W_dec + self.b_dec
        losses = {"mse": _sum_sq(recon_n - x_n)}
        family, cfg = self.cfg.family, self.cfg
        if family == "relu":
            losses["l1"] = sparsity_scale * cfg.l1_coefficient * (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif family == "jumprelu":
            l0 = step_count(pre, self.threshold, cfg.jumprelu_bandwidth)
            losses["l0"] = sparsity_scale * cfg.l0_coefficient * l0.mean()
        elif aux is not None:
            aux_values, aux_indices, live = aux.select(pre)
            aux_values = aux_values if live is None else aux_values.masked_fill(live, 0.0)
            aux_recon = scatter_dense(aux_values, aux_indices, cfg.d_sae) @ self.W_dec
            losses["auxk"] = aux.loss(aux_recon, x_n - recon_n)
        return SAEOutput(self._denormalize(recon_n), acts, None, losses, cfg.d_sae)

    def _forward_topk_sparse(self, x_n: Tensor, x_c: Tensor, aux: _AuxK | None) -> SAEOutput:
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)  # the autocast dtype under autocast
            indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        with torch.autocast(x_c.device.type, enabled=False):
            pre = pre.to(x_c.dtype)
            values = _SelectedPreActs.apply(x_c, self.W_enc, self.b_enc, pre, indices).relu()
            recon_n = _SparseDecode.apply(values, indices, self.W_dec) + self.b_dec
            losses = {"mse": _sum_sq(recon_n - x_n)}
            if aux is not None:
                with torch.no_grad():
                    aux_indices, live = aux.select(pre)[1:]
                aux_values = _SelectedPreActs.apply(x_c, self.W_enc, self.b_enc, pre, aux_indices)
                aux_values = aux_values if live is None else aux_values.masked_fill(live, 0.0)
                aux_recon = _SparseDecode.apply(aux_values, aux_indices, self.W_dec)
                losses["auxk"] = aux.loss(aux_recon, x_n - recon_n)
        return SAEOutput(self._denormalize(recon_n), values, indices, losses, self.cfg.d_sae)

    def _train_activation(self, pre: Tensor) -> Tensor:
        family = self.cfg.family
        if family == "relu":
            return pre.relu()
        if family == "topk":
            return scatter_dense(*topk_relu(pre, self.cfg.k), self.cfg.d_sae)
        if family == "jumprelu":
            return jump_relu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        if not self.training:
            return threshold_relu(pre, self.threshold)
        acts = batch_topk_relu(pre, self.cfg.k)
        self._update_batchtopk_threshold(acts)
        return acts

    @torch.no_grad()
    def _update_batchtopk_threshold(self, acts: Tensor) -> None:
        """θ ← (1 − r)·θ + r·min(kept activations > 0)  (Bussmann et al. 2024); θ stays when
        nothing was kept. Computed on the device, without reading back to the host."""
        kept = acts > 0
        smallest = acts.masked_fill(~kept, math.inf).min()
        rate = self.cfg.batchtopk_threshold_rate
        moved = self.threshold * (1 - rate) + rate * smallest
        self.threshold.copy_(torch.where(kept.any(), moved, self.threshold))

    def _auxk_active(self, dead_mask: Tensor | None, host_sync: bool = True) -> bool:
        return (
            self.cfg.uses_k
            and self.cfg.auxk_coefficient > 0
            and dead_mask is not None
            and (not host_sync or bool(dead_mask.any()))
        )

    # ---- constraints and data-driven initialisation ------------------------------------------

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component parallel to each (unit) decoder row (Gao et al. 2024).
        Call between backward() and the optimiser step; a no-op for 'relu'."""
        grad = self.W_dec.grad
        if self.cfg.unit_norm_decoder and grad is not None:
            parallel = torch.linalg.vecdot(grad, self.W_dec)  # (d_sae,) grad·w per row
            grad.addcmul_(parallel[:, None], self.W_dec, value=-1.0)

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """After an optimiser step: unit-norm decoder rows (all but 'relu') and θ ≥ 0 ('jumprelu')."""
        if self.cfg.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)
        if self.cfg.family == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def init_from_data_(self, sample: Float[Tensor, "n d_in"], *, b_dec: str = "geometric_median") -> None:
        """Set the input scale s (if cfg.normalize_input) so that E‖s·x‖ = √d_in over `sample`, then
        b_dec to the geometric median, the mean, or zero of the normalised sample."""
        self._check_input(sample)
        if b_dec not in B_DEC_INITS:
            raise ValueError(f"b_dec must be one of {list(B_DEC_INITS)}, got {b_dec!r}")
        sample = sample.reshape(-1, self.cfg.d_in).to(torch.float64)
        if self.cfg.normalize_input:
            mean_norm = float(sample.norm(dim=1).mean())
            if not mean_norm > 0:
                raise ValueError("cannot normalise inputs: the sample's mean norm is 0")
            self.input_scale.fill_(math.sqrt(self.cfg.d_in) / mean_norm)
        points = sample * float(self.input_scale)
        if b_dec == "geometric_median":
            self.b_dec.copy_(geometric_median(points))
        elif b_dec == "mean":
            self.b_dec.copy_(points.mean(0))
        else:
            self.b_dec.zero_()

    # ---- helpers -----------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of activations, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point activations, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_in:
            width = x.shape[-1] if x.dim() else "a scalar"
            site = f" at {self.cfg.site}" if self.cfg.site else ""
            raise ValueError(
                f"activations have width {width} but this SAE reads d_in={self.cfg.d_in}{site}; "
                "pass activations from the site and model the SAE was trained on"
            )

    def _normalize(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale

    def _denormalize(self, x_n: Tensor) -> Tensor:
        return x_n / self.input_scale

    def _center(self, x_n: Tensor) -> Tensor:
        return x_n - self.b_dec if self.cfg.subtract_decoder_bias else x_n

    def _sparse_path(self, x: Tensor) -> bool:
        return (
            self.cfg.family == "topk"
            and self.use_sparse_kernels
            and x.device.type in ("cpu", "cuda")
            and x.dtype in (torch.float32, torch.float64)
        )


class _AuxK:
    """The AuxK loss of Gao et al. for one batch: the k_aux largest pre-activations among dead
    latents (raw, no ReLU) reconstruct the main error e; loss α·min(n_dead / k_aux, 1)·‖e − ê‖².

    With host_sync, k_aux = min(auxk_k, n_dead) is read from the device. Without, a fixed
    min(auxk_k, d_sae) candidates are taken and `live` marks those that are not dead (their
    values are zeroed): the same dead latents, the same loss, no read-back."""

    def __init__(self, cfg: SAEConfig, dead_mask: Tensor, host_sync: bool) -> None:
        self.cfg, self.dead_mask, self.host_sync = cfg, dead_mask, host_sync
        if host_sync:
            n_dead = int(dead_mask.sum())
            self.k = min(cfg.resolved_auxk_k, n_dead)
            self.scale: float | Tensor = min(n_dead / cfg.resolved_auxk_k, 1.0)
        else:
            self.k = min(cfg.resolved_auxk_k, cfg.d_sae)
            self.scale = (dead_mask.sum() / cfg.resolved_auxk_k).clamp(max=1.0)

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(values, latent ids, live or None), each (batch, k)."""
        top = pre.masked_fill(~self.dead_mask, -math.inf).topk(self.k, dim=-1, sorted=False)
        live = None if self.host_sync else ~self.dead_mask[top.indices]
        return top.values, top.indices, live

    def loss(self, aux_recon: Tensor, residual: Tensor) -> Tensor:
        return self.cfg.auxk_coefficient * self.scale * _sum_sq(aux_recon - residual.detach())


def _sum_sq(error: Float[Tensor, "batch d"]) -> Float[Tensor, ""]:
    """E_batch ‖error‖₂² (squared error summed over features, averaged over tokens)."""
    return error.pow(2).sum(-1).mean()


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "n d"], *, n_iter: int = 100, tol: float = 1e-7
) -> Float[Tensor, " d"]:
    """argmin_y Σ_i ‖x_i − y‖₂ by Weiszfeld's algorithm, starting at the mean:
    y ← Σ_i w_i x_i / Σ_i w_i with w_i = 1 / max(‖x_i − y‖, 1e-12)."""
    y = points.mean(0)
    for _ in range(n_iter):
        weights = 1.0 / (points - y).norm(dim=1).clamp_min(1e-12)
        new_y = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (new_y - y).norm()
        y = new_y
        if moved <= tol * max(1.0, float(y.norm())):
            break
    return y
