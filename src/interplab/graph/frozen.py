"""The pieces of a block that the local replacement model freezes or reads linearly: norms with
their scale frozen from the real run, and the value path of attention (one small function per kind).

A frozen norm is affine in its input:

    RMS norm (Llama)        x ↦ w ⊙ x · r                    r = 1/√(mean(x_real²) + ε)
    RMS norm (Gemma)        x ↦ (1 + w) ⊙ x · r              same r
    LayerNorm               x ↦ w ⊙ (x − mean(x)) · r + b    r = 1/√(var(x_real) + ε); the centring is linear
    none (OLMo 2 pre-norms) x ↦ x

so its bias b is a constant term of the graph, never a source. Each frozen norm is checked
against the module itself on the real input before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from interplab.errors import UserInputError


@dataclass
class FrozenNorm:
    """x ↦ weight ⊙ (x − centre·mean(x)) · scale + bias, with scale frozen per position."""

    weight: Tensor
    """(d,) the effective per-channel gain (w, or 1 + w for Gemma)."""
    scale: Tensor
    """(seq, 1) 1/rms or 1/std of the real input."""
    bias: Tensor | None = None
    """(d,) LayerNorm's bias."""
    center: bool = False
    """LayerNorm subtracts the mean first."""

    def __call__(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        y = self.weight * (x * self.scale)
        return y if self.bias is None else y + self.bias


def _identity(x: Tensor) -> Tensor:
    return x


def _epsilon(module: nn.Module) -> float | None:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _rms_scale(real: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(real.pow(2).mean(-1, keepdim=True) + eps)


def _layer_norm(module: nn.LayerNorm, real: Tensor) -> FrozenNorm:
    scale = torch.rsqrt(real.var(-1, unbiased=False, keepdim=True) + module.eps)
    bias = None if module.bias is None else module.bias.detach().float()
    return FrozenNorm(module.weight.detach().float(), scale, bias, center=True)


def _gemma_rms_norm(module: nn.Module, real: Tensor) -> FrozenNorm:
    return FrozenNorm(1.0 + module.weight.detach().float(), _rms_scale(real, _epsilon(module)))


def _rms_norm(module: nn.Module, real: Tensor) -> FrozenNorm:
    return FrozenNorm(module.weight.detach().float(), _rms_scale(real, _epsilon(module)))


def _norm_kind(module: nn.Module):
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return _layer_norm
    if _epsilon(module) is None or getattr(module, "weight", None) is None:
        return None
    # Gemma's RMS norms store w with the gain 1 + w (GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm)
    return _gemma_rms_norm if type(module).__name__.startswith("Gemma") else _rms_norm


@torch.no_grad()
def freeze_norm(module: nn.Module | None, real: Tensor):
    """The norm `module` with its scale frozen from `real` (seq, d); identity for no norm."""
    if module is None:
        return _identity
    kind = _norm_kind(module)
    if kind is None:
        raise UserInputError(f"attribution graphs cannot freeze the norm {type(module).__name__}: expected an RMS "
                             "norm or a LayerNorm with a weight and an epsilon")
    frozen = kind(module, real.float())
    check_close(frozen(real.float()), module(real).float(), 1e-4, f"the frozen norm {type(module).__name__}")
    return frozen


# ---- attention: the value path ------------------------------------------------------------------
# Each function returns v (b, kv_heads, seq, d_head) from the attention input a (b, seq, d).


def _separate_v(attn: nn.Module, a: Tensor, d_head: int) -> Tensor:
    return _heads(attn.v_proj(a), d_head)


def _phi3_v(attn: nn.Module, a: Tensor, d_head: int) -> Tensor:
    qkv = attn.qkv_proj(a)  # [q (heads·d_head) | k (kv·d_head) | v (kv·d_head)]
    q_width = attn.config.num_attention_heads * d_head
    kv_width = (qkv.shape[-1] - q_width) // 2
    return _heads(qkv[..., q_width + kv_width:], d_head)


def _gpt2_v(attn: nn.Module, a: Tensor, d_head: int) -> Tensor:
    _, _, v = attn.c_attn(a).split(attn.split_size, dim=2)  # [q | k | v], d each
    return _heads(v, d_head)


def _neox_v(attn: nn.Module, a: Tensor, d_head: int) -> Tensor:
    b, seq, _ = a.shape
    qkv = attn.query_key_value(a).view(b, seq, -1, 3 * d_head)  # per head [q | k | v]
    return qkv[..., 2 * d_head:].transpose(1, 2)


def _heads(v: Tensor, d_head: int) -> Tensor:
    b, seq, _ = v.shape
    return v.view(b, seq, -1, d_head).transpose(1, 2)  # (b, kv_heads, seq, d_head)


_VALUE_READERS = (("v_proj", _separate_v), ("qkv_proj", _phi3_v), ("c_attn", _gpt2_v),
                  ("query_key_value", _neox_v))


def value_reader(attn: nn.Module):
    """The function that computes attention values for this attention module's layout."""
    for name, reader in _VALUE_READERS:
        if hasattr(attn, name):
            return reader
    raise UserInputError(f"attribution graphs do not know how {type(attn).__name__} computes its values "
                         f"(looked for {', '.join(n for n, _ in _VALUE_READERS)})")


def frozen_attention(attn: nn.Module, o_proj: nn.Module, pattern: Tensor, a: Tensor, d_head: int) -> Tensor:
    """o_proj(P · v(a)) with the pattern P (heads, q, k) frozen: linear (affine) in a (b, seq, d)."""
    b, seq, _ = a.shape
    n_heads = pattern.shape[0]
    v = value_reader(attn)(attn, a, d_head)  # (b, kv_heads, seq, d_head)
    v = v.repeat_interleave(n_heads // v.shape[1], dim=1)  # (b, heads, seq, d_head)
    z = (pattern @ v).transpose(1, 2).reshape(b, seq, -1)  # (b, seq, heads · d_head)
    return o_proj(z)


def check_close(got: Tensor, want: Tensor, rtol: float, what: str) -> None:
    """Refuse when `got` differs from `want` by more than rtol of want's largest entry."""
    scale = float(want.abs().max()) or 1.0
    error = float((got - want).abs().max()) / scale
    if error > rtol:
        raise RuntimeError(f"the replacement model does not reproduce {what} of the real run (relative error "
                           f"{error:.2e} > {rtol:.0e}); this architecture computes something the frozen "
                           "linear forward does not model")
