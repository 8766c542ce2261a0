"""Grouped expert MLP: every (token, slot) through its own small expert MLP, in one call.

One functional entry point, :func:`grouped_expert_mlp`, dispatching to a backend:

- ``"triton"``: CUDA tensors with Triton installed (``op.py`` / ``triton_kernels.py``); no host
  syncs, no atomics, deterministic. Also usable on CPU tensors under ``TRITON_INTERPRET=1``.
- ``"torch"``: sort once, contiguous per-expert slices (``torch_backend.py``); the CPU default and
  the always-available fallback.
- ``"reference"``: per-token Python loop (``reference.py``); for tests only.
- ``"auto"`` (default): the value of the environment variable ``FACELAYERS_MOE_BACKEND`` if set,
  else ``"triton"`` for CUDA tensors when ``import triton`` works (falling back to ``"torch"`` if the
  Triton op cannot be imported), else ``"torch"``.

Nothing is imported from Triton, compiled, or placed on CUDA at import time.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor

from .reference import ACTIVATIONS, grouped_expert_mlp_reference
from .torch_backend import grouped_expert_mlp_torch

__all__ = ["grouped_expert_mlp", "resolve_backend", "BACKENDS", "ENV_VAR"]

ENV_VAR = "FACELAYERS_MOE_BACKEND"
BACKENDS = ("auto", "triton", "torch", "reference")

_triton_op_cache: list = []  # [callable] once imported, [exception] when the import failed


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load_triton_op() -> Callable[..., Tensor]:
    """Import ``op.grouped_expert_mlp_triton`` lazily (first call only); raise ImportError if impossible."""
    if not _triton_op_cache:
        try:
            from .op import grouped_expert_mlp_triton
        except Exception as exc:  # missing op.py, missing/broken triton, ...
            _triton_op_cache.append(exc)
        else:
            _triton_op_cache.append(grouped_expert_mlp_triton)
    entry = _triton_op_cache[0]
    if isinstance(entry, Exception):
        raise ImportError(
            "the 'triton' backend of grouped_expert_mlp is unavailable: importing "
            f"facelayers.ops.grouped_experts.op failed ({type(entry).__name__}: {entry}). "
            "Use backend='torch' (or unset FACELAYERS_MOE_BACKEND)."
        ) from entry
    return entry


def resolve_backend(backend: str, x: Tensor) -> str:
    """Name of the backend that ``grouped_expert_mlp(..., backend=backend)`` would run on ``x``.

    Args:
        backend: "auto" | "triton" | "torch" | "reference".
        x: the input tensor (its device decides ``auto``).

    Returns:
        "triton", "torch" or "reference".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            return env
        if x.is_cuda and _triton_installed():
            try:
                _load_triton_op()
            except ImportError:
                return "torch"
            return "triton"
        return "torch"
    return backend


def _check_inputs(x, expert_idx, weights, w1, b1, w2, b2, activation) -> None:
    named = {"x": x, "expert_idx": expert_idx, "weights": weights, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = {"x": 2, "expert_idx": 2, "weights": 2, "w1": 3, "b1": 2, "w2": 3, "b2": 2}
    for name, rank in ranks.items():
        if named[name].dim() != rank:
            raise ValueError(f"{name} must have rank {rank}, got shape {tuple(named[name].shape)}")
    n_tokens, dim = x.shape
    num_experts, d1, hidden = w1.shape
    if d1 != dim:
        raise ValueError(f"w1 must be [E, D={dim}, H], got {tuple(w1.shape)} for x of shape {tuple(x.shape)}")
    expected = {
        "b1": (num_experts, hidden),
        "w2": (num_experts, hidden, dim),
        "b2": (num_experts, dim),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (E={num_experts}, H={hidden}, D={dim}), "
                             f"got {tuple(named[name].shape)}")
    if expert_idx.shape[0] != n_tokens:
        raise ValueError(f"expert_idx must be [N={n_tokens}, k], got {tuple(expert_idx.shape)}")
    if tuple(weights.shape) != tuple(expert_idx.shape):
        raise ValueError(f"weights must have the shape of expert_idx {tuple(expert_idx.shape)}, "
                         f"got {tuple(weights.shape)}")
    if expert_idx.dtype.is_floating_point or expert_idx.dtype.is_complex or expert_idx.dtype == torch.bool:
        raise TypeError(f"expert_idx must be an integer tensor, got {expert_idx.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    for name in ("weights", "w1", "b1", "w2", "b2"):
        if named[name].dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {named[name].dtype}")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    if not (callable(activation) or activation in ACTIVATIONS):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
    # Value check of the indices only where it costs no device sync.
    if x.device.type == "cpu" and expert_idx.numel() > 0:
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_idx values must lie in [0, {num_experts}), got range [{lo}, {hi}]")


def grouped_expert_mlp(
    x: Tensor,
    expert_idx: Tensor,
    weights: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
    backend: str = "auto",
) -> Tensor:
    """Weighted sum of per-(token, slot) expert MLPs.

    Semantics (all backends agree on this)::

        out[n] = sum_j weights[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e]),  e = expert_idx[n, j]

    with ``act`` = exact erf GELU for "gelu" (``nn.GELU()`` default), ``x * sigmoid(1.702 x)`` for
    "quick_gelu", ``relu`` for "relu", or any elementwise callable. An expert index may appear
    several times in a row (its contributions add up); experts that receive no token get zero
    gradients. All floating tensors must share one dtype and device (``MoEFFN`` casts for autocast).

    Args:
        x: ``[N, D]`` token features.
        expert_idx: ``[N, k]`` integer expert ids in ``[0, E)`` (checked on CPU only: a check on
            CUDA would need a device sync).
        weights: ``[N, k]`` gate weights.
        w1: ``[E, D, H]`` up-projections; b1: ``[E, H]``.
        w2: ``[E, H, D]`` down-projections; b2: ``[E, D]``.
        activation: "gelu" | "quick_gelu" | "relu" | callable.
        backend: "auto" | "triton" | "torch" | "reference" (see module docstring; ``auto`` honours
            the environment variable ``FACELAYERS_MOE_BACKEND``).

    Returns:
        ``[N, D]`` in the dtype of ``x``.

    Examples::

        >>> E, D, H, N, k = 4, 8, 16, 10, 2
        >>> x = torch.randn(N, D)
        >>> idx = torch.randint(0, E, (N, k))
        >>> gates = torch.rand(N, k)
        >>> w1, b1 = torch.randn(E, D, H), torch.zeros(E, H)
        >>> w2, b2 = torch.randn(E, H, D), torch.zeros(E, D)
        >>> grouped_expert_mlp(x, idx, gates, w1, b1, w2, b2).shape
        torch.Size([10, 8])
    """
    _check_inputs(x, expert_idx, weights, w1, b1, w2, b2, activation)
    name = resolve_backend(backend, x)
    if name == "torch":
        return grouped_expert_mlp_torch(x, expert_idx, weights, w1, b1, w2, b2, activation)
    if name == "reference":
        return grouped_expert_mlp_reference(x, expert_idx, weights, w1, b1, w2, b2, activation)
    op = _load_triton_op()  # explicit "triton" (argument or env var): raise if unavailable
    return op(x, expert_idx, weights, w1, b1, w2, b2, activation)
