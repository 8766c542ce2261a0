"""Host side of the Triton grouped-expert MLP: launch wrappers, custom ops, autograd, entry point.

Ladder (see ``docs/kernels.md``): ``reference.py`` (per-token loop) → ``triton_kernels.py``
(``@triton.jit`` kernels) → this file (``torch.library.custom_op`` ops with fake implementations and
autograd formulas) → :func:`grouped_expert_mlp_triton` (functional entry point, called by the
``"triton"`` backend of :func:`facelayers.ops.grouped_experts.grouped_expert_mlp`).

One call does, with no host synchronisation:

1. routing: a stable sort of the ``N * k`` (token, slot) pairs by expert, and per-expert row offsets by
   ``searchsorted`` (both stay on the device);
2. ``facelayers::grouped_experts_up``: ``H[i] = x[token(i)] @ w1[e] + b1[e]`` in expert-sorted order
   (rows of ``x`` gathered on load);
3. the activation, in PyTorch (so any callable works and autograd differentiates it);
4. ``facelayers::grouped_experts_down_combine``: ``Y[slot(i)] = A[i] @ w2[e] + b2[e]`` (rows scattered
   on store back to ``(token, slot)`` order), then the gate-weighted sum over the ``k`` slots by a
   small kernel (fp32 accumulation, fixed slot order).

Backward (registered with ``register_autograd``; the backward ops are custom ops too, so
``torch.compile`` traces both directions): ``d(gates)`` by a row-dot kernel against the saved ``Y``;
``dA`` by the same grouped GEMM kernel with ``w2`` transposed through its strides, reading the rows of
``dout`` of each slot's token and scaling by the slot's gate (``gate * dout`` is never stored);
``dW2``/``db2`` and ``dW1``/``db1`` by a per-expert ``X^T dY`` kernel (one program per output tile
walks its expert's rows in order: exact zeros for empty experts, no atomics); ``dx`` as a k-sum of
per-slot rows.

Nothing here imports Triton, compiles a kernel or touches CUDA at import time. CPU tensors run the
kernels in Triton's interpreter (``TRITON_INTERPRET=1`` semantics, selected per call from the tensor
device, so the import order of ``triton`` does not matter); CUDA tensors run the compiled kernels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .activations import ACTIVATIONS, resolve_activation
from .validation import check_grouped_expert_inputs

__all__ = ["grouped_expert_mlp_triton", "ACTIVATIONS"]

# Block sizes of the interpreter (CPU) path: small, so tests with D/H of a few dozen still cover
# several K iterations, several N tiles and partial tiles.
_INTERP_META = {
    "grouped_gemm_kernel": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
    "grouped_weight_grad_kernel": dict(BLOCK_K=32, BLOCK_N=32, BLOCK_M=32),
    "combine_kernel": dict(BLOCK_T=32, BLOCK_D=32),
    "combine_gate_grad_kernel": dict(BLOCK_T=32, BLOCK_D=32),
}
# CUDA configs when not autotuned (fp32/fp64 GEMMs, and the memory-bound combine kernels always).
_CUDA_META = {
    "grouped_gemm_kernel": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    "grouped_weight_grad_kernel": dict(BLOCK_K=64, BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=3),
    "combine_kernel": dict(BLOCK_T=16, BLOCK_D=256, num_warps=4),
    "combine_gate_grad_kernel": dict(BLOCK_T=16, BLOCK_D=256, num_warps=4),
}
_TUNED = ("grouped_gemm_kernel", "grouped_weight_grad_kernel")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CUDA_GEMM_TUNE = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4)]
# (BLOCK_K, BLOCK_N, BLOCK_M, num_warps, num_stages)
_CUDA_WGRAD_TUNE = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)]


# --------------------------------------------------------------------------------------------------
# kernel selection (lazy: Triton is imported on the first launch only)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _kernels() -> Any:
    try:
        from facelayers.ops.grouped_experts import triton_kernels
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'triton' grouped-expert backend needs the `triton` package; install it or use "
            "backend='torch'"
        ) from exc
    return triton_kernels


@functools.cache
def _interpreted(name: str) -> Any:
    """The interpreter version of a kernel, whatever ``TRITON_INTERPRET`` said at import time."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(getattr(_kernels(), name).fn)


@functools.cache
def _autotuned(name: str) -> Any:
    import triton

    kernel = getattr(_kernels(), name)
    if name == "grouped_gemm_kernel":
        configs = [
            triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=kk), num_warps=w, num_stages=s)
            for m, n, kk, w, s in _CUDA_GEMM_TUNE
        ]
        key = ["K", "N_OUT", "GATHER", "SCATTER"]
    else:
        configs = [
            triton.Config(dict(BLOCK_K=kk, BLOCK_N=n, BLOCK_M=m), num_warps=w, num_stages=s)
            for kk, n, m, w, s in _CUDA_WGRAD_TUNE
        ]
        key = ["K", "N_OUT", "X_GATHER", "DY_GATHER"]
    return triton.autotune(configs=configs, key=key)(kernel)


def _launch(name: str, device: torch.device, dtype: torch.dtype, grid_fn: Callable, *args: Any, **consts: Any) -> None:
    """Launch kernel ``name`` with block sizes picked for the device and dtype."""
    if device.type == "cpu":
        kernel, meta = _interpreted(name), dict(_INTERP_META[name])
    elif device.type == "cuda":
        from triton.runtime.jit import JITFunction

        kernel = getattr(_kernels(), name)
        tune = (
            name in _TUNED
            and dtype in (torch.float16, torch.bfloat16)
            and isinstance(kernel, JITFunction)  # not when TRITON_INTERPRET=1 made it an interpreted one
            and os.environ.get("FACELAYERS_TRITON_AUTOTUNE", "1") != "0"
        )
        if tune:
            kernel, meta = _autotuned(name), {}
        else:
            meta = dict(_CUDA_META[name])
    else:
        raise ValueError(f"the 'triton' grouped-expert backend runs on CUDA or CPU tensors "
                         f"(expected a cuda or cpu device, got {device})")
    if meta:
        kernel[grid_fn(meta)](*args, **consts, **meta)
    else:
        kernel[grid_fn](*args, **consts)


def _dot_consts(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    import triton.language as tl

    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if dtype == torch.float32:
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    elif dtype == torch.float64:
        precision = "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    # The interpreter's bf16 (and fp16) dot is unreliable: upcast operands to the accumulator dtype.
    interpreted = device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1"
    upcast = interpreted and dtype in (torch.float16, torch.bfloat16)
    return dict(ACC_DTYPE=acc, UPCAST=upcast, DOT_PRECISION=precision)


def _grouped_gemm(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    out: Tensor,
    order: Tensor,
    offsets: Tensor,
    *,
    in_div: int,
    gather: bool,
    scatter: bool,
    transpose_w: bool,
    scale: Tensor | None = None,
) -> Tensor:
    """``out[out(i)] = s_i * (x[in(i)] @ W[e]) (+ b[e])``, ``W[e] = w[e]`` or ``w[e].T``, ``s_i =
    scale[order[i]]`` (or 1); fills all M rows."""
    num_rows = order.shape[0]
    num_experts = w.shape[0]
    if transpose_w:
        k_dim, n_dim = w.shape[2], w.shape[1]
        s_wk, s_wn = w.stride(2), w.stride(1)
    else:
        k_dim, n_dim = w.shape[1], w.shape[2]
        s_wk, s_wn = w.stride(1), w.stride(2)
    if num_rows == 0 or n_dim == 0:
        return out

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (
            (num_rows + meta["BLOCK_M"] - 1) // meta["BLOCK_M"] + num_experts - 1,
            (n_dim + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],
        )

    bias = b if b is not None else w
    _launch(
        "grouped_gemm_kernel",
        x.device,
        x.dtype,
        grid,
        x,
        w,
        bias,
        out,
        order,
        offsets,
        scale if scale is not None else order,
        num_experts,
        k_dim,
        n_dim,
        in_div,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        s_wk,
        s_wn,
        bias.stride(0) if b is not None else 0,
        bias.stride(1) if b is not None else 0,
        out.stride(0),
        out.stride(1),
        GATHER=gather,
        SCATTER=scatter,
        HAS_BIAS=b is not None,
        ROW_SCALE=scale is not None,
        **_dot_consts(x.dtype, x.device),
    )
    return out


def _grouped_weight_grad(
    x: Tensor,
    dy: Tensor,
    order: Tensor,
    offsets: Tensor,
    num_experts: int,
    *,
    x_div: int,
    x_gather: bool,
    dy_gather: bool,
    dy_div: int = 1,
    dy_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``dw[e] = x[rows_e]^T (s * dy[rows_e])`` ``[E, Kx, Ny]`` and ``db[e] = sum(s * dy[rows_e])`` ``[E, Ny]``
    with ``s = dy_scale[order[i]]`` (or 1)."""
    k_dim, n_dim = x.shape[1], dy.shape[1]
    dw = _new_output((num_experts, k_dim, n_dim), x.dtype, x.device)
    db = _new_output((num_experts, n_dim), x.dtype, x.device)
    if order.shape[0] == 0 or k_dim == 0 or n_dim == 0:
        dw.zero_()
        db.zero_()
        return dw, db

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (
            num_experts,
            ((k_dim + meta["BLOCK_K"] - 1) // meta["BLOCK_K"]) * ((n_dim + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]),
        )

    _launch(
        "grouped_weight_grad_kernel",
        x.device,
        x.dtype,
        grid,
        x,
        dy,
        dw,
        db,
        order,
        offsets,
        dy_scale if dy_scale is not None else order,
        k_dim,
        n_dim,
        x_div,
        dy_div,
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        db.stride(0),
        db.stride(1),
        X_GATHER=x_gather,
        DY_GATHER=dy_gather,
        DY_SCALE=dy_scale is not None,
        HAS_BIAS=True,
        **_dot_consts(x.dtype, x.device),
    )
    return dw, db


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate a buffer that a kernel fully overwrites (tests replace this to NaN-poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("facelayers::grouped_experts_up", mutates_args=())
def grouped_up(x: Tensor, w: Tensor, b: Tensor, order: Tensor, offsets: Tensor, k: int) -> Tensor:
    """Up-projection in expert-sorted order.

    Args:
        x: ``[N, D]`` tokens.
        w: ``[E, D, H]`` expert weights; ``b``: ``[E, H]``.
        order: ``[N * k]`` int64, flat slot index (``token * k + slot``) of each expert-sorted row.
        offsets: ``[E + 1]`` int32 row offsets of each expert in the sorted order.
        k: slots per token.

    Returns:
        ``[N * k, H]``: row ``i`` is ``x[order[i] // k] @ w[e] + b[e]`` for the expert ``e`` of row ``i``.
    """
    out = _new_output((order.shape[0], w.shape[2]), x.dtype, x.device)
    return _grouped_gemm(x, w, b, out, order, offsets, in_div=k, gather=True, scatter=False, transpose_w=False)


@grouped_up.register_fake
def _grouped_up_fake(x: Tensor, w: Tensor, b: Tensor, order: Tensor, offsets: Tensor, k: int) -> Tensor:
    return x.new_empty((order.shape[0], w.shape[2]))


@torch.library.custom_op("facelayers::grouped_experts_up_backward", mutates_args=())
def grouped_up_backward(
    dh: Tensor, x: Tensor, w: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`grouped_up`: ``(dx [N, D], dw [E, D, H], db [E, H])``."""
    num_tokens, dim = x.shape
    if k == 1:
        dx = _new_output((num_tokens, dim), x.dtype, x.device)
        _grouped_gemm(dh, w, None, dx, order, offsets, in_div=1, gather=False, scatter=True, transpose_w=True)
    else:
        slot_dtype = _accum_dtype(x.dtype)
        dx_slots = _new_output((order.shape[0], dim), slot_dtype, x.device)
        _grouped_gemm(dh, w, None, dx_slots, order, offsets, in_div=1, gather=False, scatter=True, transpose_w=True)
        dx = _combine(dx_slots, None, k, num_tokens, x.dtype)
    dw, db = _grouped_weight_grad(x, dh, order, offsets, w.shape[0], x_div=k, x_gather=True, dy_gather=False)
    return dx, dw, db


@grouped_up_backward.register_fake
def _grouped_up_backward_fake(
    dh: Tensor, x: Tensor, w: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty((w.shape[0], w.shape[2]))


def _grouped_up_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, w, _b, order, offsets, k = inputs
    ctx.save_for_backward(x, w, order, offsets)
    ctx.k = k


def _grouped_up_grad(ctx: Any, dh: Tensor) -> tuple:
    x, w, order, offsets = ctx.saved_tensors
    dx, dw, db = grouped_up_backward(dh, x, w, order, offsets, ctx.k)
    return dx, dw, db, None, None, None


grouped_up.register_autograd(_grouped_up_grad, setup_context=_grouped_up_setup)


def _combine(y: Tensor, gates: Tensor | None, k: int, num_tokens: int, out_dtype: torch.dtype) -> Tensor:
    """``out[n] = sum_j gates[n, j] * y[n * k + j]`` (``gates = 1`` if None), accumulated in fp32 (fp64 for
    fp64), written in ``out_dtype``."""
    dim = y.shape[1]
    out = _new_output((num_tokens, dim), out_dtype, y.device)
    if num_tokens == 0 or dim == 0:
        return out.zero_()
    import triton.language as tl

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return ((num_tokens + meta["BLOCK_T"] - 1) // meta["BLOCK_T"], (dim + meta["BLOCK_D"] - 1) // meta["BLOCK_D"])

    _launch(
        "combine_kernel", y.device, y.dtype, grid,
        y, gates if gates is not None else y, out, num_tokens, dim, k,
        y.stride(0), y.stride(1), gates.stride(0) if gates is not None else 0,
        gates.stride(1) if gates is not None else 0, out.stride(0), out.stride(1),
        HAS_GATES=gates is not None,
        ACC_DTYPE=tl.float64 if y.dtype == torch.float64 else tl.float32,
    )
    return out


def _combine_gate_grad(dout: Tensor, y: Tensor, k: int) -> Tensor:
    """``dgates[n, j] = <dout[n], y[n * k + j]>`` ``[N, k]`` (fixed-order reduction)."""
    num_tokens, dim = dout.shape
    dgates = _new_output((num_tokens, k), dout.dtype, dout.device)
    if num_tokens == 0 or k == 0:
        return dgates.zero_()
    import triton.language as tl

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return ((num_tokens + meta["BLOCK_T"] - 1) // meta["BLOCK_T"],)

    _launch(
        "combine_gate_grad_kernel", dout.device, dout.dtype, grid,
        dout, y, dgates, num_tokens, dim, k,
        dout.stride(0), dout.stride(1), y.stride(0), y.stride(1), dgates.stride(0), dgates.stride(1),
        ACC_DTYPE=tl.float64 if dout.dtype == torch.float64 else tl.float32,
    )
    return dgates


@torch.library.custom_op("facelayers::grouped_experts_down_combine", mutates_args=())
def grouped_down_combine(
    a: Tensor, w: Tensor, b: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Down-projection back to (token, slot) order, then the gate-weighted sum over the ``k`` slots.

    Args:
        a: ``[M, H]`` activations in expert-sorted order (``M = N * k``).
        w: ``[E, H, D]`` expert weights; ``b``: ``[E, D]``.
        gates: ``[N, k]`` gate weight of each (token, slot).
        order, offsets, k: as in :func:`grouped_up`.

    Returns:
        ``out`` ``[N, D]`` (``out[n] = sum_j gates[n, j] * y[n * k + j]``) and the per-slot expert outputs
        ``y`` ``[M, D]`` (``y[order[i]] = a[i] @ w[e] + b[e]``; kept for the gate gradient, not
        differentiable).
    """
    y = _new_output((order.shape[0], w.shape[2]), a.dtype, a.device)
    _grouped_gemm(a, w, b, y, order, offsets, in_div=1, gather=False, scatter=True, transpose_w=False)
    return _combine(y, gates, k, gates.shape[0], a.dtype), y


@grouped_down_combine.register_fake
def _grouped_down_combine_fake(
    a: Tensor, w: Tensor, b: Tensor, gates: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    return a.new_empty((gates.shape[0], w.shape[2])), a.new_empty((order.shape[0], w.shape[2]))


@torch.library.custom_op("facelayers::grouped_experts_down_combine_backward", mutates_args=())
def grouped_down_combine_backward(
    dout: Tensor, a: Tensor, w: Tensor, gates: Tensor, y: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`grouped_down_combine`: ``(da [M, H], dw [E, H, D], db [E, D], dgates [N, k])``.

    ``gates * dout`` (the gradient of ``y``) is never stored: both kernels read ``dout`` rows of the
    slot's token and scale them by the slot's gate on the fly.
    """
    gates_flat = gates.reshape(-1)
    da = _new_output(tuple(a.shape), a.dtype, a.device)
    _grouped_gemm(
        dout, w, None, da, order, offsets, in_div=k, gather=True, scatter=False, transpose_w=True, scale=gates_flat
    )
    dw, db = _grouped_weight_grad(
        a, dout, order, offsets, w.shape[0], x_div=1, x_gather=False, dy_gather=True, dy_div=k, dy_scale=gates_flat
    )
    return da, dw, db, _combine_gate_grad(dout, y, k)


@grouped_down_combine_backward.register_fake
def _grouped_down_combine_backward_fake(
    dout: Tensor, a: Tensor, w: Tensor, gates: Tensor, y: Tensor, order: Tensor, offsets: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    db = w.new_empty((w.shape[0], w.shape[2]))
    return a.new_empty(a.shape), w.new_empty(w.shape), db, gates.new_empty(gates.shape)


def _grouped_down_combine_setup(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    a, w, _b, gates, order, offsets, k = inputs
    ctx.save_for_backward(a, w, gates, output[1], order, offsets)
    ctx.mark_non_differentiable(output[1])
    ctx.k = k


def _grouped_down_combine_grad(ctx: Any, dout: Tensor, _dy: Tensor | None) -> tuple:
    a, w, gates, y, order, offsets = ctx.saved_tensors
    da, dw, db, dgates = grouped_down_combine_backward(dout, a, w, gates, y, order, offsets, ctx.k)
    return da, dw, db, dgates, None, None, None


grouped_down_combine.register_autograd(_grouped_down_combine_grad, setup_context=_grouped_down_combine_setup)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def sort_by_expert(expert_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable sort of the flattened (token, slot) pairs by expert, on the device (no host sync).

    Args:
        expert_idx: ``[N, k]`` integer expert of each (token, slot).
        num_experts: ``E``.

    Returns:
        ``order`` ``[N * k]`` int64 (flat slot index ``token * k + slot`` of each sorted row) and
        ``offsets`` ``[E + 1]`` int32 (expert ``e`` owns sorted rows ``offsets[e]:offsets[e + 1]``).
    """
    flat = expert_idx.reshape(-1).to(torch.int64)
    sorted_experts, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_experts, bounds, out_int32=True)
    return order, offsets


def _check_triton_inputs(
    x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: Any
) -> None:
    """The op's one validator (``validation.py``), then what only this backend needs (dtype set, device)."""
    check_grouped_expert_inputs(x, expert_idx, weights, w1, b1, w2, b2, activation)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"the 'triton' backend needs x in float16, bfloat16, float32 or float64 "
                        f"(expected one of those, got {x.dtype})")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the 'triton' backend runs on CUDA (or CPU via the interpreter) "
                         f"(expected a cuda or cpu device, got {x.device})")


def grouped_expert_mlp_triton(
    x: Tensor, expert_idx: Tensor, weights: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
) -> Tensor:
    """Mixture of expert MLPs with Triton grouped GEMMs (forward and backward).

    ``out[n] = sum_j weights[n, j] * (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])``, ``e = expert_idx[n, j]``.
    Differentiable w.r.t. ``x``, ``weights``, ``w1``, ``b1``, ``w2`` and ``b2``. Deterministic, no
    atomics, no host synchronisation on CUDA (on CPU the kernels run in Triton's interpreter, which
    is slow and meant for tests).

    Args:
        x: ``[N, D]`` tokens (float16, bfloat16, float32 or float64; accumulation in float32, or
            float64 for float64 inputs).
        expert_idx: ``[N, k]`` integer expert of each slot, values in ``[0, E)``.
        weights: ``[N, k]`` gate weight of each slot.
        w1: ``[E, D, H]``; b1: ``[E, H]``; w2: ``[E, H, D]``; b2: ``[E, D]`` (dtype of ``x``).
        activation: ``"gelu"`` (exact erf), ``"quick_gelu"`` (``x * sigmoid(1.702 x)``), ``"relu"``
            or a callable applied elementwise to ``[N * k, H]``.

    Returns:
        ``[N, D]`` in the dtype of ``x``.

    Examples::

        >>> x = torch.randn(6304, 768, device="cuda", dtype=torch.bfloat16)
        >>> idx = torch.randint(0, 4, (6304, 2), device="cuda")
        >>> gates = torch.rand(6304, 2, device="cuda", dtype=torch.bfloat16)
        >>> w1 = torch.randn(4, 768, 512, device="cuda", dtype=torch.bfloat16) * 0.02
        >>> w2 = torch.randn(4, 512, 768, device="cuda", dtype=torch.bfloat16) * 0.02
        >>> b1, b2 = w1.new_zeros(4, 512), w1.new_zeros(4, 768)
        >>> grouped_expert_mlp_triton(x, idx, gates, w1, b1, w2, b2, "gelu").shape
        torch.Size([6304, 768])
    """
    _check_triton_inputs(x, expert_idx, weights, w1, b1, w2, b2, activation)
    k = expert_idx.shape[1]
    order, offsets = sort_by_expert(expert_idx, w1.shape[0])
    if x.is_cuda and not torch.compiler.is_compiling():
        # Indices outside [0, E) would leave rows unprocessed. No host sync on the GPU path: a
        # device-side assert on the offsets (all ids in range <=> offsets[0] == 0 and offsets[E] == N*k).
        torch._assert_async((offsets[0] == 0) & (offsets[-1] == order.shape[0]), "expert_idx values must be in [0, E)")
    h = grouped_up(x, w1, b1, order, offsets, k)  # [N*k, H], expert-sorted
    a = resolve_activation(activation)(h)
    out, _ = grouped_down_combine(a, w2, b2, weights.contiguous(), order, offsets, k)
    return out
