"""The released SSM code's private-expert dispatch, kept as the benchmark baseline (one definition).

A Python loop over (slot, present expert) with ``unique()`` (a host sync per step) and boolean-mask
gathers/scatters, as in MSA-LMC/SSM ``ssm/models/moe.py`` -- but with correct routing (each token
goes to the experts it picked). Same signature and semantics as
``facelayers.ops.grouped_experts.grouped_expert_mlp``.

It is registered as the grouped-expert backend :data:`RELEASE_BACKEND` (``register_release_backend()``,
called on import), so any ``MoEFFN`` runs it without patching: ``layer.backend = RELEASE_BACKEND``
(or ``FACELAYERS_MOE_BACKEND=release_masked_loop``, or ``grouped_expert_mlp(..., backend=RELEASE_BACKEND)``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from facelayers.ops.grouped_experts import available_backends, register_backend
from facelayers.ops.grouped_experts.activations import resolve_activation

RELEASE_BACKEND = "release_masked_loop"


def masked_loop(x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                activation: str | Callable[[Tensor], Tensor] = "gelu") -> Tensor:
    """Release-style dispatch (loop over slots and present experts, boolean masks), correct routing.

    Shapes: ``x [N, D]``, ``expert_idx [N, k]``, ``weights [N, k]``, ``w1 [E, D, H]``, ``b1 [E, H]``,
    ``w2 [E, H, D]``, ``b2 [E, D]`` -> ``[N, D]``.
    """
    act = resolve_activation(activation)
    n, k = expert_idx.shape
    outs = x.new_zeros(n, k, x.shape[1])
    for j in range(k):
        idx_j = expert_idx[:, j]
        chunk = x.new_zeros(n, x.shape[1])
        for e in idx_j.unique().tolist():  # host sync, as in the release
            mask = idx_j == e
            h = act(torch.addmm(b1[e], x[mask], w1[e]))
            chunk[mask] = torch.addmm(b2[e], h, w2[e])
        outs[:, j, :] = chunk
    return (outs * weights.unsqueeze(-1)).sum(dim=1)


def register_release_backend() -> str:
    """Register :func:`masked_loop` as the backend :data:`RELEASE_BACKEND` (idempotent); returns its name."""
    if RELEASE_BACKEND not in available_backends():
        register_backend(RELEASE_BACKEND, masked_loop)
    return RELEASE_BACKEND


register_release_backend()
