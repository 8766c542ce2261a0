"""Training losses of the SSM paper: expression CE (eqs. 7/12), AU BCE (eqs. 8/13), joint loss (eq. 14).

* :func:`expression_loss` -- softmax cross-entropy over ``K`` expression classes, with optional
  label smoothing and class weights.
* :func:`au_loss` -- binary cross-entropy with logits over ``M`` AUs for ``[B, M]`` (centre frame)
  or ``[B, T, M]`` (all frames) logits, with optional ``pos_weight`` and a ``mask`` so that padded or
  unlabelled frames never count.
* :func:`joint_loss` -- ``L_exp / (1 + lam) + lam * L_au / (1 + lam)`` (eq. 14); either task may be
  missing in a step.

Host syncs: the functions never read tensor values back to the host on an accelerator. Checks of
shapes and dtypes always run; checks of *values* (class indices in range, targets in ``[0, 1]``,
weights non-negative) are cheap and optional: ``check_values=None`` (default) runs them when the
tensor is on the CPU (no synchronisation there) and skips them elsewhere; ``True`` always runs them
(one host sync per call on a GPU), ``False`` never.

An empty batch (``B = 0``, or no element at all) is an error: its mean would be NaN.

Reduction note: eq. 8 sums over the ``M`` AUs and averages over the batch. ``au_loss(...,
reduction="mean")`` averages over every counted (sample, AU) element, like
:class:`torch.nn.BCEWithLogitsLoss` and the released code, i.e. eq. 8 divided by ``M``; pass
``reduction="sum"`` and divide by the number of samples yourself for the literal eq. 8.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expression_loss", "au_loss", "joint_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def expression_loss(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_values: bool | None = None,
    classes: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy for single-label expression classification (paper eqs. 7 and 12).

    Args:
        logits: ``[B, K]`` unnormalised class scores.
        target: ``[B]`` integer class indices in ``[0, K)``, or ``[B, K]`` class probabilities
            (soft labels, rows summing to 1).
        weight: optional ``[K]`` non-negative class weights. With ``reduction="mean"`` and index
            targets the result is divided by the sum of the weights of the targets (PyTorch's
            convention), so uniform weights give the unweighted loss.
        label_smoothing: in ``[0, 1)``; the target becomes ``(1 - eps) * onehot + eps / K``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[B]``).
        check_values: check class indices and weights by value (see the module docstring).
        classes: optional class indices (distinct, in ``[0, K)``) the softmax runs over; the other
            logits are left out, as if those classes did not exist (training with some classes
            held out, e.g. the unseen-class transfer setting: a plain ``K``-way softmax would
            push the held-out logits down on every step). Targets must lie in ``classes`` (an
            index target outside it is an error when values are checked; a probability target
            must put no mass outside). ``weight`` stays ``[K]``; smoothing spreads over
            ``len(classes)``. ``None`` (default): all ``K`` classes.

    Returns:
        Scalar loss (or ``[B]`` for ``reduction="none"``).

    Raises:
        ValueError: bad shapes, an empty batch, or (when checked) out-of-range values.
        TypeError: wrong dtypes.

    Examples::

        >>> expression_loss(torch.randn(4, 7), torch.tensor([0, 3, 6, 2]), label_smoothing=0.1)
        tensor(...)
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError(f"logits have the wrong shape (expected a Tensor [B, K], got {_desc(logits)})")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (expected a float dtype, got {logits.dtype})")
    b, k = logits.shape
    if b == 0 or k == 0:
        raise ValueError(
            f"expression_loss needs a non-empty batch (expected logits [B >= 1, K >= 1], got shape {tuple(logits.shape)})"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction is unknown (expected one of {_REDUCTIONS}, got {reduction!r})")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing is out of range (expected a value in [0, 1), got {label_smoothing})")
    if not isinstance(target, Tensor):
        raise TypeError(
            f"target must be a Tensor (expected [B]={[b]} indices or [B, K]={[b, k]} probabilities, "
            f"got {type(target).__name__})"
        )
    if target.ndim == 1:
        if target.shape[0] != b:
            raise ValueError(f"target has the wrong shape (expected [B]=[{b}], got {tuple(target.shape)})")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"class-index target must be an integer tensor (expected an integer dtype, got {target.dtype})")
        if _check_values(check_values, target):
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"target class indices are out of range for K={k} logits "
                    f"(expected values in [0, {k}), got values in [{lo}, {hi}])"
                )
        target = target.long()
    elif target.ndim == 2:
        if tuple(target.shape) != (b, k):
            raise ValueError(
                f"probability target has the wrong shape (expected [B, K]=[{b}, {k}], got {tuple(target.shape)})"
            )
        if not target.is_floating_point():
            raise TypeError(
                f"[B, K] target must hold probabilities (expected a float dtype, got {target.dtype})"
            )
    else:
        raise ValueError(
            f"target has the wrong shape (expected [B]=[{b}] or [B, K]=[{b}, {k}], got {tuple(target.shape)})"
        )
    if weight is not None:
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (k,):
            raise ValueError(f"weight has the wrong shape (expected a Tensor [K]=[{k}], got {_desc(weight)})")
        if _check_values(check_values, weight) and (weight < 0).any():
            raise ValueError(f"weight must be non-negative (expected values >= 0, got min {float(weight.min())})")
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    if classes is not None:
        logits, target, weight = _restrict_classes(logits, target, weight, classes, check_values)
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction)


def _restrict_classes(
    logits: Tensor, target: Tensor, weight: Tensor | None, classes: Sequence[int] | Tensor, check_values: bool | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``expression_loss(classes=...)``: keep the listed logits and re-index the targets."""
    k = logits.shape[1]
    if isinstance(classes, Tensor):
        if classes.ndim != 1 or classes.is_floating_point() or classes.dtype == torch.bool:
            raise ValueError(f"classes must be 1-D integer class indices (expected [C] integers, got {_desc(classes)})")
        ids = [int(c) for c in classes.tolist()]
    else:
        try:
            ids = [operator.index(c) for c in classes]
        except TypeError:
            raise TypeError(f"classes must be integer class indices (expected a sequence of int, got {classes!r})") from None
    if not ids:
        raise ValueError("classes is empty (expected at least one class index)")
    bad = [c for c in ids if not 0 <= c < k]
    if bad:
        raise ValueError(f"classes are out of range for K={k} logits (expected values in [0, {k}), got {bad})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes has repeated indices (expected distinct values, got {ids})")
    idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
    if target.ndim == 1:
        lookup = torch.full((k,), -1, dtype=torch.long, device=target.device)
        lookup[idx.to(target.device)] = torch.arange(len(ids), device=target.device)
        new_target = lookup[target]
        if _check_values(check_values, target) and (new_target < 0).any():
            outside = sorted({int(t) for t in target[new_target < 0].tolist()})
            raise ValueError(f"target classes are not in classes (expected targets among {ids}, got {outside})")
    else:
        kept = target.index_select(1, idx.to(target.device))
        if _check_values(check_values, target):
            lost = float((target.sum(1) - kept.sum(1)).abs().max())
            if lost > 1e-6:
                raise ValueError(f"probability target puts mass outside classes (expected 0 outside {ids}, got up to {lost:.3g})")
        new_target = kept
    new_weight = weight.index_select(0, idx) if weight is not None else None
    return logits.index_select(1, idx), new_target, new_weight


def au_loss(
    logits: Tensor,
    target: Tensor,
    *,
    pos_weight: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: str = "mean",
    check_values: bool | None = None,
) -> Tensor:
    """Binary cross-entropy with logits for multi-label AU detection (paper eqs. 8 and 13).

    Args:
        logits: ``[..., M]`` AU logits, e.g. ``[B, M]`` (centre frame) or ``[B, T, M]`` (all frames).
        target: same shape as ``logits``; values in ``[0, 1]`` (0/1 labels, or soft labels).
        pos_weight: optional ``[M]`` positive weights (> 0) multiplying the positive term, e.g.
            ``#negatives / #positives`` per AU from the training set.
        mask: optional bool (or 0/1) tensor whose shape is a leading part of ``logits.shape``
            (``[B]``, ``[B, T]``, or the full ``[..., M]``); **True / 1 = this element counts**.
            Masked-out samples, frames or AUs contribute nothing to the loss or its gradient.
        reduction: ``"mean"`` -- mean over counted elements (zero, still attached to the graph,
            when nothing counts); ``"sum"``; ``"none"`` -- elementwise ``[..., M]`` with zeros at
            masked-out elements.
        check_values: check targets, ``pos_weight`` and an integer ``mask`` by value (see the module
            docstring).

    Returns:
        Scalar loss (or ``[..., M]`` for ``reduction="none"``).

    Raises:
        ValueError: bad shapes, an empty batch, or (when checked) out-of-range values.
        TypeError: wrong dtypes.

    Examples::

        >>> logits, y = torch.randn(2, 16, 12), torch.randint(0, 2, (2, 16, 12)).float()
        >>> valid = torch.ones(2, 16, dtype=torch.bool); valid[1, 10:] = False  # padded frames
        >>> au_loss(logits, y, mask=valid)
        tensor(...)
    """
    if not isinstance(logits, Tensor) or logits.ndim < 1:
        raise ValueError(f"logits have the wrong shape (expected a Tensor [..., M], got {_desc(logits)})")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point (expected a float dtype, got {logits.dtype})")
    if logits.numel() == 0:
        raise ValueError(
            f"au_loss needs a non-empty batch (expected logits [..., M] with at least one element, "
            f"got shape {tuple(logits.shape)})"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction is unknown (expected one of {_REDUCTIONS}, got {reduction!r})")
    if not isinstance(target, Tensor) or target.shape != logits.shape:
        raise ValueError(f"target has the wrong shape (expected the logits' shape {tuple(logits.shape)}, got {_desc(target)})")
    target = target.to(logits.dtype)
    if _check_values(check_values, target) and ((target < 0) | (target > 1)).any():
        raise ValueError(
            f"target values are out of range (expected values in [0, 1], "
            f"got values in [{float(target.min())}, {float(target.max())}])"
        )
    m = logits.shape[-1]
    if pos_weight is not None:
        if not isinstance(pos_weight, Tensor) or tuple(pos_weight.shape) != (m,):
            raise ValueError(f"pos_weight has the wrong shape (expected a Tensor [M]=[{m}], got {_desc(pos_weight)})")
        if _check_values(check_values, pos_weight) and ((pos_weight <= 0).any() or not torch.isfinite(pos_weight).all()):
            raise ValueError(
                f"pos_weight must be finite and > 0 (expected finite values > 0, got {pos_weight.tolist()})"
            )
        pos_weight = pos_weight.to(device=logits.device, dtype=logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    if mask is None:
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()
    if not isinstance(mask, Tensor) or mask.ndim > logits.ndim or tuple(mask.shape) != tuple(logits.shape[: mask.ndim]):
        raise ValueError(
            f"mask must have a leading part of the logits' shape (expected e.g. [B], [B, T] or the full "
            f"shape of {tuple(logits.shape)}, got {_desc(mask)})"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool or integer 0/1, True = counts (expected torch.bool, got {mask.dtype})")
        if _check_values(check_values, mask) and ((mask != 0) & (mask != 1)).any():
            raise ValueError(
                f"an integer mask must hold only 0 and 1 (expected values in {{0, 1}}, "
                f"got values in [{int(mask.min())}, {int(mask.max())}])"
            )
        mask = mask.bool()
    full = mask.reshape(tuple(mask.shape) + (1,) * (logits.ndim - mask.ndim)).expand_as(loss)
    # where (not multiply): a masked element may hold inf/nan logits without poisoning the result.
    loss = torch.where(full, loss, loss.new_zeros(()))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / full.sum().clamp_min(1).to(loss.dtype)


def joint_loss(
    l_exp: Tensor | None,
    l_au: Tensor | None,
    lam: float = 2.0,
    *,
    renormalize_missing: bool = False,
) -> Tensor:
    """Joint objective of paper eq. 14: ``L_exp / (1 + lam) + lam * L_au / (1 + lam)``.

    ``d total / d L_exp = 1 / (1 + lam)`` and ``d total / d L_au = lam / (1 + lam)`` (paper default
    ``lam = 2``: 1/3 and 2/3).

    A task may be missing in a step (pass ``None``). By default the present task **keeps its eq. 14
    coefficient** (``l_exp / (1 + lam)`` or ``lam * l_au / (1 + lam)``), so a task's gradient scale
    does not jump when the other task's loader is exhausted. With ``renormalize_missing=True`` the
    present loss is returned unweighted (coefficient 1).

    Args:
        l_exp: scalar expression loss, or ``None``.
        l_au: scalar AU loss, or ``None``.
        lam: task-balancing ``lambda >= 0`` (finite).
        renormalize_missing: see above.

    Returns:
        Scalar total loss.

    Raises:
        ValueError: both losses are ``None``, a loss is not a scalar, or ``lam`` is invalid.

    Examples::

        >>> joint_loss(torch.tensor(0.9), torch.tensor(0.3), lam=2.0)
        tensor(0.5000)
    """
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam is out of range (expected a finite number >= 0, got {lam})")
    if l_exp is None and l_au is None:
        raise ValueError("joint_loss needs at least one of l_exp, l_au (expected a Tensor, got None for both)")
    for name, val in (("l_exp", l_exp), ("l_au", l_au)):
        if val is not None and (not isinstance(val, Tensor) or val.ndim != 0):
            raise ValueError(f"{name} must be a scalar (expected a 0-d Tensor or None, got {_desc(val)})")
    w_exp, w_au = 1.0 / (1.0 + lam), lam / (1.0 + lam)
    if l_au is None:
        return l_exp if renormalize_missing else l_exp * w_exp
    if l_exp is None:
        return l_au if renormalize_missing else l_au * w_au
    return l_exp * w_exp + l_au * w_au


def _check_values(flag: bool | None, t: Tensor) -> bool:
    """Run a value check? ``None``: only where it costs no host sync (CPU tensors)."""
    if flag is None:
        return t.device.type == "cpu"
    return bool(flag)


def _desc(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
