"""Grouped expert MLP: every (token, slot) through its own small expert MLP, in one call.

One functional entry point, :func:`grouped_expert_mlp`, dispatching to a backend of the registry:

- ``"triton"``: CUDA tensors with Triton installed (``op.py`` / ``triton_kernels.py``); no host
  syncs, no atomics, deterministic. Also usable on CPU tensors (the kernels then run in Triton's
  interpreter; slow, for tests).
- ``"torch"``: sort once, contiguous per-expert slices (``torch_backend.py``); the CPU default and
  the always-available fallback.
- ``"reference"``: per-token Python loop (``reference.py``); for tests only.
- ``"auto"`` (default): the value of the environment variable ``FACELAYERS_MOE_BACKEND`` if set,
  else ``"triton"`` for CUDA tensors when Triton is installed and the Triton op imports (falling back
  to ``"torch"`` otherwise), else ``"torch"``.
- any name added with :func:`register_backend` (e.g. a benchmark's baseline loop): usable as
  ``backend=`` argument, as ``MoEFFN(backend=...)`` and in ``FACELAYERS_MOE_BACKEND``.

Surfaces of the op, one each: input checks in ``validation.py``, activations in ``activations.py``,
the Triton probe :func:`triton_installed` (here), backends in the registry (here).
Nothing is imported from Triton, compiled, or placed on CUDA at import time.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

from torch import Tensor

from .activations import ACTIVATIONS, resolve_activation
from .reference import grouped_expert_mlp_reference
from .torch_backend import grouped_expert_mlp_torch
from .validation import check_grouped_expert_inputs

__all__ = [
    "grouped_expert_mlp",
    "resolve_backend",
    "register_backend",
    "unregister_backend",
    "available_backends",
    "triton_installed",
    "BACKENDS",
    "ENV_VAR",
    "ACTIVATIONS",
    "resolve_activation",
]

ENV_VAR = "FACELAYERS_MOE_BACKEND"
#: The built-in backend names (``"auto"`` included). Registered backends come on top: see
#: :func:`available_backends`.
BACKENDS = ("auto", "triton", "torch", "reference")

#: Signature of a backend: ``fn(x, expert_idx, weights, w1, b1, w2, b2, activation) -> [N, D]``.
BackendFn = Callable[..., Tensor]

_triton_op_cache: list = []  # [callable] once imported, [exception] when the import failed


def triton_installed() -> bool:
    """The one Triton probe: whether the ``triton`` package is installed (imports nothing, touches no GPU)."""
    return importlib.util.find_spec("triton") is not None


_triton_installed = triton_installed  # the name resolve_backend calls (tests replace it)


def _load_triton_op() -> BackendFn:
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


# Built-in entries look their function up at call time (so the module attributes stay the single
# source, e.g. for tests that replace them).
def _run_torch(*args: object) -> Tensor:
    return grouped_expert_mlp_torch(*args)


def _run_reference(*args: object) -> Tensor:
    return grouped_expert_mlp_reference(*args)


def _run_triton(*args: object) -> Tensor:
    return _load_triton_op()(*args)


_REGISTRY: dict[str, BackendFn] = {"triton": _run_triton, "torch": _run_torch, "reference": _run_reference}
_BUILTIN = frozenset(_REGISTRY)


def register_backend(name: str, fn: BackendFn, *, overwrite: bool = False) -> None:
    """Add a backend to :func:`grouped_expert_mlp`'s registry.

    Args:
        name: the backend name (not "auto", not a built-in name).
        fn: ``fn(x, expert_idx, weights, w1, b1, w2, b2, activation) -> [N, D]`` with the semantics of
            :func:`grouped_expert_mlp`; it receives validated inputs (shapes, dtypes, devices) and the
            activation as given (a registered name or a callable; see ``resolve_activation``).
        overwrite: replace an existing registered (non built-in) backend of that name.

    Examples::

        >>> def loop(x, idx, w, w1, b1, w2, b2, activation):  # doctest: +SKIP
        ...     ...
        >>> register_backend("my_loop", loop)  # doctest: +SKIP
        >>> grouped_expert_mlp(x, idx, w, w1, b1, w2, b2, backend="my_loop")  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto' (expected a new name, got {name!r})")
    if not callable(fn):
        raise TypeError(f"backend function must be callable (expected a callable, got {type(fn).__name__})")
    if name in _BUILTIN:
        raise ValueError(f"cannot replace the built-in backend {name!r} (expected a name not in {sorted(_BUILTIN)}, "
                         f"got {name!r})")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"backend {name!r} is already registered (expected a new name or overwrite=True, got {name!r})")
    _REGISTRY[name] = fn


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (built-in backends cannot be removed)."""
    if name in _BUILTIN or name not in _REGISTRY:
        raise ValueError(f"not a registered (non built-in) backend (expected one of "
                         f"{sorted(set(_REGISTRY) - _BUILTIN)}, got {name!r})")
    del _REGISTRY[name]


def available_backends() -> tuple[str, ...]:
    """Every name accepted as ``backend=`` now: ``"auto"``, the built-ins, then registered ones."""
    return ("auto",) + tuple(_REGISTRY)


def resolve_backend(backend: str, x: Tensor) -> str:
    """Name of the backend that ``grouped_expert_mlp(..., backend=backend)`` would run on ``x``.

    Args:
        backend: "auto" or a name of :func:`available_backends`.
        x: the input tensor (its device decides ``auto``).

    Returns:
        A registered backend name ("triton", "torch", "reference" or a registered one).
    """
    names = available_backends()
    if backend not in names:
        raise ValueError(f"backend must be one of {names} (expected a registered name, got {backend!r})")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in names:
                raise ValueError(f"environment variable {ENV_VAR} must be one of {names} "
                                 f"(expected a registered name, got {env!r})")
            return env
        if x.is_cuda and _triton_installed():
            try:
                _load_triton_op()
            except ImportError:
                return "torch"
            return "triton"
        return "torch"
    return backend


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

    with ``act`` from the registry of ``activations.py`` ("gelu" = exact erf GELU, ``nn.GELU()``
    default; "quick_gelu" = ``x * sigmoid(1.702 x)``; "relu") or any elementwise callable. An expert
    index may appear several times in a row (its contributions add up); experts that receive no token
    get zero gradients. All floating tensors must share one dtype and device (``MoEFFN`` casts for
    autocast).

    Args:
        x: ``[N, D]`` token features.
        expert_idx: ``[N, k]`` integer expert ids in ``[0, E)`` (checked on CPU only: a check on
            CUDA would need a device sync).
        weights: ``[N, k]`` gate weights.
        w1: ``[E, D, H]`` up-projections; b1: ``[E, H]``.
        w2: ``[E, H, D]`` down-projections; b2: ``[E, D]``.
        activation: "gelu" | "quick_gelu" | "relu" | callable.
        backend: "auto" | "triton" | "torch" | "reference" | a registered name (see the module
            docstring; ``auto`` honours the environment variable ``FACELAYERS_MOE_BACKEND``).

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
    check_grouped_expert_inputs(x, expert_idx, weights, w1, b1, w2, b2, activation)
    name = resolve_backend(backend, x)
    return _REGISTRY[name](x, expert_idx, weights, w1, b1, w2, b2, activation)
