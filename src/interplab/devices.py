"""Copies of references (vectors, means, SAE weights) on the device and dtype of the activation
they touch.

A model spread over devices (`load(..., device_map=...)`) runs each block on its own device, and
a bf16 model hands hooks bf16 activations. An intervention holds its reference once, on the CPU or
wherever the user made it; the hook asks for the copy that matches the activation, which is made
the first time and reused afterwards (never moved on every call).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class Copies:
    """Per-(device, dtype) copies of tensors and per-device copies of modules.

    >>> copies = Copies()
    >>> act + copies.like(vector, act)     # vector on act.device, in act.dtype
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple, Tensor] = {}
        self._modules: dict[tuple, nn.Module] = {}

    def like(self, tensor: Tensor, act: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """`tensor` on `act`'s device, in `dtype` (default: `act`'s dtype)."""
        dtype = act.dtype if dtype is None else dtype
        if tensor.device == act.device and tensor.dtype == dtype:
            return tensor
        key = (id(tensor), act.device, dtype)
        if key not in self._tensors:
            self._tensors[key] = tensor.detach().to(device=act.device, dtype=dtype)
        return self._tensors[key]

    def module_on(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` itself when its parameters are on `device`, else a copy moved there (made once)."""
        first = next(module.parameters(), None)
        if first is None or first.device == device:
            return module
        key = (id(module), device)
        if key not in self._modules:
            self._modules[key] = copy.deepcopy(module).to(device)
        return self._modules[key]

    def __len__(self) -> int:
        return len(self._tensors) + len(self._modules)
