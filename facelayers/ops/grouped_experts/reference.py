"""Obviously-correct per-token loop for the grouped expert MLP (tests only).

Slow by design: one Python iteration per (token, slot). Every fast backend is tested against it.
Activations come from the one registry, ``activations.py`` (re-exported here for older imports).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .activations import ACTIVATIONS, resolve_activation

__all__ = ["grouped_expert_mlp_reference", "resolve_activation", "ACTIVATIONS"]


def grouped_expert_mlp_reference(
    x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
) -> Tensor:
    """Per-token loop: ``out[n] = sum_j weights[n, j] * expert_{expert_idx[n, j]}(x[n])``.

    Args:
        x: ``[N, D]`` tokens.
        expert_idx: ``[N, k]`` expert index of each (token, slot).
        weights: ``[N, k]`` gate weight of each (token, slot).
        w1: ``[E, D, H]``; b1: ``[E, H]``; w2: ``[E, H, D]``; b2: ``[E, D]``.
        activation: "gelu" | "quick_gelu" | "relu" | callable.

    Returns:
        ``[N, D]``.
    """
    act = resolve_activation(activation)
    n_tokens, k = expert_idx.shape
    rows = []
    for n in range(n_tokens):
        acc = torch.zeros_like(x[n])
        for j in range(k):
            e = int(expert_idx[n, j])
            h = act(x[n] @ w1[e] + b1[e])
            acc = acc + weights[n, j] * (h @ w2[e] + b2[e])
        rows.append(acc)
    if not rows:
        return x.new_zeros((0, x.shape[-1]))
    return torch.stack(rows)
