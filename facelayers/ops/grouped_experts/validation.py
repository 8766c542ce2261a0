"""The one input validator of the grouped-expert op (the dispatcher and the Triton entry point call it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .activations import check_activation

__all__ = ["check_grouped_expert_inputs"]


def check_grouped_expert_inputs(
    x: Any, expert_idx: Any, weights: Any, w1: Any, b1: Any, w2: Any, b2: Any, activation: Any
) -> None:
    """Check types, ranks, shapes, dtypes, devices and (on CPU only) index values; raise a clear error.

    Shapes: ``x [N, D]``, ``expert_idx [N, k]`` (integer), ``weights [N, k]``, ``w1 [E, D, H]``,
    ``b1 [E, H]``, ``w2 [E, H, D]``, ``b2 [E, D]``; every floating tensor in the dtype of ``x``, every
    tensor on the device of ``x``. The value range of ``expert_idx`` is checked only for CPU tensors and
    outside ``torch.compile`` tracing (on CUDA it would cost a device sync).

    Raises:
        TypeError: a non-tensor, a non-integer ``expert_idx``, a non-floating ``x``, a dtype mismatch.
        ValueError: a wrong rank, shape, device, activation name or index value.
    """
    named = {"x": x, "expert_idx": expert_idx, "weights": weights, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (expected Tensor, got {type(t).__name__})")
    ranks = {"x": 2, "expert_idx": 2, "weights": 2, "w1": 3, "b1": 2, "w2": 3, "b2": 2}
    for name, rank in ranks.items():
        if named[name].dim() != rank:
            raise ValueError(f"{name} must have rank {rank} (expected rank {rank}, got shape {tuple(named[name].shape)})")
    n_tokens, dim = x.shape
    num_experts, d1, hidden = w1.shape
    if d1 != dim:
        raise ValueError(f"w1 must be [E, D={dim}, H] for x of shape {tuple(x.shape)} "
                         f"(expected w1.shape[1] == {dim}, got shape {tuple(w1.shape)})")
    expected = {"b1": (num_experts, hidden), "w2": (num_experts, hidden, dim), "b2": (num_experts, dim)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (E={num_experts}, H={hidden}, D={dim}) "
                             f"(expected {shape}, got {tuple(named[name].shape)})")
    if expert_idx.shape[0] != n_tokens:
        raise ValueError(f"expert_idx must be [N={n_tokens}, k] (expected {n_tokens} rows, "
                         f"got shape {tuple(expert_idx.shape)})")
    if tuple(weights.shape) != tuple(expert_idx.shape):
        raise ValueError(f"weights must have the shape of expert_idx (expected {tuple(expert_idx.shape)}, "
                         f"got {tuple(weights.shape)})")
    if expert_idx.dtype.is_floating_point or expert_idx.dtype.is_complex or expert_idx.dtype == torch.bool:
        raise TypeError(f"expert_idx must be an integer tensor (expected an integer dtype, got {expert_idx.dtype})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point (expected a floating dtype, got {x.dtype})")
    for name in ("weights", "w1", "b1", "w2", "b2"):
        if named[name].dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x (expected {x.dtype}, got {named[name].dtype})")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x (expected {x.device}, got {t.device})")
    check_activation(activation)
    if x.device.type == "cpu" and expert_idx.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_idx values must lie in [0, {num_experts}), i.e. expert_idx values must be "
                             f"in [0, {num_experts}) for E={num_experts} experts "
                             f"(expected 0 <= value < {num_experts}, got range [{lo}, {hi}])")
