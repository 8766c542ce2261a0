"""Triton kernels of the grouped-expert MLP (``@triton.jit`` only; host code lives in ``op.py``).

All kernels work on the *expert-sorted* layout produced once per call by ``op.py``:

* ``order`` ``[M]`` (int64, ``M = N * k``): a stable sort of the flattened ``(token, slot)`` pairs by
  expert; sorted row ``i`` is flat slot ``order[i]`` = ``token * k + slot`` of token ``order[i] // k``.
* ``offsets`` ``[E + 1]`` (int32, on the device): expert ``e`` owns sorted rows
  ``offsets[e] : offsets[e + 1]``.

The grouped GEMM uses a launch grid that does not depend on the routing (no host sync):
``cdiv(M, BLOCK_M) + E - 1`` row tiles is an upper bound of ``sum_e cdiv(count_e, BLOCK_M)``; each
program finds its expert with a short scalar scan over ``offsets`` and programs past the last tile do
nothing. Every output element is written by exactly one program and every reduction runs in a fixed
order, so results are deterministic and no atomics are used.

The sort-once "scatter-to-scatter" formulation (gather rows on load, scatter rows on store, so that the
permuted copies of the activations never exist in memory) follows ScatterMoE (Tan et al., 2024,
"Scattered Mixture-of-Experts Implementation"); the code here is written from that description.

The kernels call only Triton builtins (no ``tl.cdiv``/``tl.sum``/``tl.zeros``, which are themselves ``@triton.jit``
functions): ``op.py`` can then run them in Triton's interpreter on CPU tensors even when
``TRITON_INTERPRET`` was not set before ``triton`` was first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_combine(a, b):
    return a + b


# ``tl.sum``'s own combine function when this Triton has it: the interpreter recognises it and reduces
# with numpy (a user combine function is interpreted element by element, far too slow for tests).
_sum_combine = getattr(tl.standard, "_sum_combine", _add_combine)


@triton.jit
def grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    idx_ptr,
    offsets_ptr,
    scale_ptr,
    num_experts,
    K,
    N_OUT,
    in_div,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_be,
    stride_bn,
    stride_ym,
    stride_yn,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y[out(i)] = s_i * (x[in(i)] @ w[e]) (+ b[e])`` for every sorted row ``i`` of expert ``e``.

    ``in(i) = idx[i] // in_div`` if ``GATHER`` else ``i``; ``out(i) = idx[i]`` if ``SCATTER`` else ``i``;
    ``s_i = scale[idx[i]]`` if ``ROW_SCALE`` else 1 (applied to the fp32 accumulator).
    ``w[e]`` is read as a ``[K, N_OUT]`` matrix through its strides (a transposed view costs nothing).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Find the expert owning row tile ``pid_m`` (scan of E scalars; E is small).
    zero = pid_m * 0
    expert = zero - 1
    row_start = zero
    row_end = zero
    tiles_before = zero
    for e in range(0, num_experts):
        seg_start = tl.load(offsets_ptr + e)
        seg_end = tl.load(offsets_ptr + e + 1)
        n_tiles = (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, seg_start + (pid_m - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, seg_end, row_end)
        tiles_before += n_tiles

    if expert >= 0:
        offs_m = row_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        slots = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        if GATHER:
            in_rows = slots // in_div
        else:
            in_rows = offs_m.to(tl.int64)
        if SCATTER:
            out_rows = slots
        else:
            out_rows = offs_m.to(tl.int64)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + in_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(ACC_DTYPE)
                b = b.to(ACC_DTYPE)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        if ROW_SCALE:
            row_scale = tl.load(scale_ptr + slots, mask=mask_m, other=0.0).to(ACC_DTYPE)
            acc = acc * row_scale[:, None]
        if HAS_BIAS:
            bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
            acc += bias.to(ACC_DTYPE)[None, :]

        y_ptrs = y_ptr + out_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def grouped_weight_grad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    db_ptr,
    idx_ptr,
    offsets_ptr,
    scale_ptr,
    K,
    N_OUT,
    x_div,
    dy_div,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_dwe,
    stride_dwk,
    stride_dwn,
    stride_dbe,
    stride_dbn,
    X_GATHER: tl.constexpr,
    DY_GATHER: tl.constexpr,
    DY_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``dw[e] = x[rows_e]^T @ dy[rows_e]`` and ``db[e] = sum(dy[rows_e])`` per expert ``e``.

    Grid: ``(E, cdiv(K, BLOCK_K) * cdiv(N_OUT, BLOCK_N))``. Rows of ``x`` are ``idx[i] // x_div`` if
    ``X_GATHER`` else ``i``; rows of ``dy`` are ``idx[i] // dy_div`` if ``DY_GATHER`` else ``i``, scaled by
    ``scale[idx[i]]`` if ``DY_SCALE`` (the gate weight, so ``gate * dout`` is never stored). Each program owns
    one ``[BLOCK_K, BLOCK_N]`` tile of one expert and walks that expert's rows in order, so an empty
    expert writes exact zeros and no atomics are needed. The bias gradient is accumulated by the
    programs of the first ``K`` tile from the ``dy`` tiles they already load.
    """
    expert = tl.program_id(0)
    pid = tl.program_id(1)
    num_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
    pid_k = pid // num_n
    pid_n = pid % num_n

    seg_start = tl.load(offsets_ptr + expert)
    seg_end = tl.load(offsets_ptr + expert + 1)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT

    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, dtype=ACC_DTYPE)
    bacc = tl.full((BLOCK_N,), 0.0, dtype=ACC_DTYPE)
    for m0 in range(seg_start, seg_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        slots = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        if X_GATHER:
            x_rows = slots // x_div
        else:
            x_rows = offs_m.to(tl.int64)
        if DY_GATHER:
            dy_rows = slots // dy_div
        else:
            dy_rows = offs_m.to(tl.int64)
        xt = tl.load(
            x_ptr + x_rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
            mask=mask_k[:, None] & mask_m[None, :],
            other=0.0,
        )
        dy = tl.load(
            dy_ptr + dy_rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        if DY_SCALE:
            row_scale = tl.load(scale_ptr + slots, mask=mask_m, other=0.0).to(ACC_DTYPE)
            dy_scaled = dy.to(ACC_DTYPE) * row_scale[:, None]
            if HAS_BIAS:
                bacc += tl.reduce(dy_scaled, 0, _sum_combine)
            dy = dy_scaled.to(dy_ptr.dtype.element_ty)  # rounded like a stored ``gate * dout``
        elif HAS_BIAS:
            bacc += tl.reduce(dy.to(ACC_DTYPE), 0, _sum_combine)
        if UPCAST:
            xt = xt.to(ACC_DTYPE)
            dy = dy.to(ACC_DTYPE)
        acc = tl.dot(xt, dy, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_dwe + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])
    if HAS_BIAS:
        db_ptrs = db_ptr + expert.to(tl.int64) * stride_dbe + offs_n * stride_dbn
        tl.store(db_ptrs, bacc.to(db_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


@triton.jit
def combine_kernel(
    y_ptr,
    g_ptr,
    out_ptr,
    N,
    D,
    k,
    stride_ym,
    stride_yd,
    stride_gn,
    stride_gk,
    stride_on,
    stride_od,
    HAS_GATES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[n] = sum_j g[n, j] * y[n * k + j]`` (``g = 1`` without ``HAS_GATES``; slots summed in order
    ``j = 0..k-1`` in the accumulator dtype)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    rows = offs_t.to(tl.int64)
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, dtype=ACC_DTYPE)
    for j in range(0, k):
        y = tl.load(y_ptr + (rows * k + j)[:, None] * stride_ym + offs_d[None, :] * stride_yd, mask=mask, other=0.0)
        if HAS_GATES:
            g = tl.load(g_ptr + rows * stride_gn + j * stride_gk, mask=mask_t, other=0.0).to(ACC_DTYPE)
            acc += g[:, None] * y.to(ACC_DTYPE)
        else:
            acc += y.to(ACC_DTYPE)
    out_ptrs = out_ptr + rows[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_gate_grad_kernel(
    dout_ptr,
    y_ptr,
    dg_ptr,
    N,
    D,
    k,
    stride_on,
    stride_od,
    stride_ym,
    stride_yd,
    stride_gn,
    stride_gk,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``dg[n, j] = sum_d dout[n, d] * y[n * k + j, d]`` (fixed-order reduction over ``d``)."""
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    rows = offs_t.to(tl.int64)
    for j in range(0, k):
        acc = tl.full((BLOCK_T,), 0.0, dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_t[:, None] & (offs_d < D)[None, :]
            do = tl.load(dout_ptr + rows[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
            y = tl.load(y_ptr + (rows * k + j)[:, None] * stride_ym + offs_d[None, :] * stride_yd, mask=mask, other=0.0)
            acc += tl.reduce(do.to(ACC_DTYPE) * y.to(ACC_DTYPE), 1, _sum_combine)
        tl.store(dg_ptr + rows * stride_gn + j * stride_gk, acc.to(dg_ptr.dtype.element_ty), mask=mask_t)
