"""Evaluation metrics for AU detection and expression recognition, as the field reports them.

Conventions (see ``docs/metrics.md``):

* Argument order is ``(preds, target)`` (torchmetrics / scikit-learn's ``(y_pred, y_true)`` reversed
  like torchmetrics). Values are fractions in ``[0, 1]``, never percentages.
* AU predictions are **probabilities** in ``[0, 1]`` (apply ``torch.sigmoid`` to logits first); an
  AU is predicted active iff ``prob >= threshold`` (a tie at the threshold counts as positive).
* An AU's F1 is **undefined** (NaN) when it has no positive labels and no positive predictions
  (``2TP + FP + FN = 0``); undefined AUs are excluded from the mean, and the mean is NaN when every
  AU is undefined. ``zero_division=0.0`` counts them as 0 instead (scikit-learn's default and the
  released SSM code's behaviour).
* An AU's AUC is undefined (NaN, excluded from the mean) when its targets hold a single class.
* UAR is the mean recall over the classes **present in the targets**; classes without support are
  ignored (their recall is NaN in ``per_class_recall``). WAR is plain accuracy.
* :func:`tuned_au_f1` chooses thresholds / temporal votes on the labels it is scored on. It is an
  **optimistic** number, reported only under that explicit name (the released SSM code reports it).

Streaming meters (:class:`AUMeter`, :class:`ExpressionMeter`) accumulate over batches and, when
``torch.distributed`` is initialised, reduce across ranks in ``compute()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "au_f1",
    "au_auc",
    "per_class_recall",
    "uar",
    "war",
    "confusion_matrix",
    "tuned_au_f1",
    "seen_unseen_curve",
    "AUMeter",
    "ExpressionMeter",
]

OPTIMISTIC_NOTE = (
    "optimistic: threshold(s) and temporal vote were selected to maximise F1 on the same labels they "
    "are scored on; this is not a held-out estimate (report au_f1 at threshold 0.5 as the main number)"
)


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _desc(x: object) -> str:
    if isinstance(x, Tensor):
        return f"Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_probs(probs: Tensor, name: str = "probs", min_dims: int = 2) -> None:
    if not isinstance(probs, Tensor) or probs.ndim < min_dims:
        shape = "[N, M]" if min_dims == 2 else "[..., M]"
        raise ValueError(f"{name} has the wrong shape (expected a Tensor {shape}, got {_desc(probs)})")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating point probabilities (expected a float dtype, got {probs.dtype})")
    if probs.numel():
        if not bool(torch.isfinite(probs).all()):
            raise ValueError(f"{name} must be finite (expected finite probabilities, got NaN or inf values)")
        lo, hi = float(probs.min()), float(probs.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} must be probabilities; apply torch.sigmoid to logits "
                f"(expected values in [0, 1], got values in [{lo:.6g}, {hi:.6g}])"
            )


def _binary_target(target: Tensor, shape: torch.Size, name: str = "target") -> Tensor:
    if not isinstance(target, Tensor) or target.shape != shape:
        raise ValueError(f"{name} has the wrong shape (expected the shape of probs {tuple(shape)}, got {_desc(target)})")
    if target.dtype == torch.bool:
        return target
    if target.numel() and bool(((target != 0) & (target != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1 (expected binary labels, got other values)")
    return target != 0


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is out of range (expected a value in [0, 1], got {threshold})")
    return threshold


def _check_num_classes(num_classes: int) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (expected an int >= 1, got {num_classes!r})")
    return num_classes


def _class_pred(pred: Tensor, num_classes: int | None, name: str = "pred") -> Tensor:
    """``[N]`` indices or ``[N, K]`` logits/probabilities -> ``[N]`` long indices."""
    if not isinstance(pred, Tensor):
        raise TypeError(
            f"{name} must be a Tensor (expected [N] class indices or [N, K] logits, got {type(pred).__name__})"
        )
    if pred.ndim == 2:
        if not pred.is_floating_point():
            raise TypeError(f"[N, K] {name} must be floating point scores (expected a float dtype, got {pred.dtype})")
        if num_classes is not None and pred.shape[1] != num_classes:
            raise ValueError(f"{name} scores have the wrong shape (expected [N, K={num_classes}], got {tuple(pred.shape)})")
        return pred.argmax(dim=1)
    if pred.ndim == 1:
        if pred.is_floating_point() or pred.dtype == torch.bool or pred.is_complex():
            raise TypeError(f"[N] {name} must hold integer class indices (expected an integer dtype, got {pred.dtype})")
        pred = pred.long()
        if num_classes is not None and pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
            raise ValueError(
                f"{name} class indices are out of range "
                f"(expected values in [0, {num_classes}), got values in [{int(pred.min())}, {int(pred.max())}])"
            )
        return pred
    raise ValueError(f"{name} has the wrong shape (expected [N] class indices or [N, K] scores, got {tuple(pred.shape)})")


def _class_target(target: Tensor, n: int, num_classes: int | None) -> Tensor:
    if not isinstance(target, Tensor) or target.ndim != 1 or target.shape[0] != n:
        raise ValueError(f"target has the wrong shape (expected a Tensor of class indices [N]=[{n}], got {_desc(target)})")
    return _class_pred(target, num_classes, name="target")


def _f1_from_counts(tp: Tensor, fp: Tensor, fn: Tensor, zero_division: float) -> Tensor:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.full_like(den, float(zero_division)))


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    if not bool(ok.any()):
        return math.nan
    return float(x[ok].mean())


# --------------------------------------------------------------------------------------------------
# AU metrics
# --------------------------------------------------------------------------------------------------


def _au_counts(probs: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    pred = probs >= threshold
    tp = (pred & target).sum(0)
    fp = (pred & ~target).sum(0)
    fn = (~pred & target).sum(0)
    return tp, fp, fn


def au_f1(
    probs: Tensor, target: Tensor, threshold: float = 0.5, *, zero_division: float = math.nan
) -> dict[str, Tensor | float]:
    """Per-AU F1 at a fixed threshold and its mean (the standard BP4D / DISFA metric).

    ``F1_j = 2 TP_j / (2 TP_j + FP_j + FN_j)`` with ``pred = probs >= threshold``.

    Args:
        probs: ``[N, M]`` probabilities in ``[0, 1]`` (N frames, M AUs).
        target: ``[N, M]`` binary labels (bool, int or float 0/1).
        threshold: decision threshold in ``[0, 1]``; ties count as positive.
        zero_division: value of an undefined F1 (no positive labels and no positive predictions).
            Default NaN: reported as undefined and excluded from the mean. ``0.0`` reproduces
            scikit-learn's default and the released SSM code.

    Returns:
        ``{"per_au": float64 Tensor[M] (CPU), "mean": float}``; ``mean`` is NaN if every AU is
        undefined.

    Raises:
        ValueError: no frame (``N = 0``; as :func:`uar` / :func:`war`), bad shapes or values.

    Examples::

        >>> au_f1(torch.tensor([[0.9, 0.2], [0.4, 0.1]]), torch.tensor([[1, 0], [1, 0]]))["per_au"]
        tensor([0.6667,    nan], dtype=torch.float64)
    """
    _check_probs(probs)
    tgt = _binary_target(target, probs.shape)
    if probs.shape[0] == 0:
        raise ValueError(f"au_f1 needs at least one frame (expected N >= 1, got shape {tuple(probs.shape)})")
    tp, fp, fn = _au_counts(probs, tgt, _check_threshold(threshold))
    per_au = _f1_from_counts(tp, fp, fn, zero_division).cpu()
    return {"per_au": per_au, "mean": _nanmean(per_au)}


def _auc_1d(score: Tensor, pos: Tensor) -> float:
    n = score.numel()
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_score, order = torch.sort(score)
    _, inverse, counts = torch.unique_consecutive(sorted_score, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based mean rank of each tie group
    ranks = torch.empty(n, dtype=torch.float64, device=score.device)
    ranks[order] = avg_rank[inverse]
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def au_auc(probs: Tensor, target: Tensor) -> dict[str, Tensor | float]:
    """Per-AU ROC AUC (Mann-Whitney statistic with tied scores counted as 1/2) and its mean.

    Args:
        probs: ``[N, M]`` scores in ``[0, 1]``.
        target: ``[N, M]`` binary labels.

    Returns:
        ``{"per_au": float64 Tensor[M] (CPU), "mean": float}``; an AU whose targets hold a single
        class is undefined (NaN) and excluded from the mean.
    """
    _check_probs(probs)
    tgt = _binary_target(target, probs.shape)
    if probs.shape[0] == 0:
        raise ValueError(f"au_auc needs at least one frame (expected N >= 1, got probs of shape {tuple(probs.shape)})")
    per_au = torch.tensor(
        [_auc_1d(probs[:, j], tgt[:, j]) for j in range(probs.shape[1])], dtype=torch.float64
    )
    return {"per_au": per_au, "mean": _nanmean(per_au)}


def _segment_bounds(segment_ids: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last row index of the segment each row belongs to."""
    if segment_ids is None:
        return torch.zeros(n, dtype=torch.long, device=device), torch.full((n,), n - 1, dtype=torch.long, device=device)
    if not isinstance(segment_ids, Tensor) or segment_ids.shape != (n,) or segment_ids.is_floating_point():
        raise ValueError(f"segment_ids has the wrong shape or dtype (expected an integer Tensor [N]=[{n}], got {_desc(segment_ids)})")
    seg = segment_ids.to(device)
    change = torch.ones(n, dtype=torch.bool, device=device)
    change[1:] = seg[1:] != seg[:-1]
    run = change.long().cumsum(0) - 1
    run_ids = seg[change]
    if torch.unique(run_ids).numel() != run_ids.numel():
        raise ValueError(
            "segment_ids must list each segment's frames as one consecutive run of rows in temporal order "
            "(expected one run per segment id, got a segment id in two separate runs)"
        )
    starts = torch.nonzero(change).flatten()
    ends = torch.cat([starts[1:] - 1, torch.tensor([n - 1], device=device)])
    return starts[run], ends[run]


def tuned_au_f1(
    probs: Tensor,
    target: Tensor,
    thresholds: Sequence[float] | None = None,
    vote_windows: Sequence[int] = (0,),
    *,
    vote_fractions: Sequence[float] = (0.5,),
    per_au: bool = False,
    segment_ids: Tensor | None = None,
    zero_division: float = math.nan,
) -> dict[str, object]:
    """F1 with threshold(s) and a temporal vote **tuned on the labels it is given -- optimistic**.

    For every candidate (threshold ``th``, vote half-width ``K``, vote fraction ``p``) frames are
    binarised (``prob >= th``), then each frame is replaced by a vote over the ``W = 2K + 1``-frame
    window around it (edge frames repeated at segment ends): positive iff
    ``#positives in window >= p * W``. The candidate with the best mean F1 (``per_au=False``: one
    global choice, as in the released SSM code) or the best F1 for each AU (``per_au=True``, even
    more optimistic; an AU without positive labels then prefers predicting nothing, which leaves its
    F1 undefined and excluded from the mean) is kept. Ties go to the smallest window, then the
    fraction nearest 0.5, then the threshold nearest 0.5.

    Because the choice is made on the evaluation labels themselves, the result is an optimistic,
    not held-out, estimate; it is what the released code prints as "Best post-processed F1" (use
    ``thresholds=[i / 100 for i in range(1, 100)], vote_windows=(3,), vote_fractions=(0.3,),
    zero_division=0.0``; the release votes across the whole concatenated test set, i.e.
    ``segment_ids=None``). Select on a validation split and apply with fixed values for an honest
    number.

    Cost: memory ``O(len(thresholds) * N * M)``; time grows with the number of (K, p) candidates
    and the window widths.

    Args:
        probs: ``[N, M]`` probabilities, rows in temporal order within each segment.
        target: ``[N, M]`` binary labels.
        thresholds: candidate thresholds in ``[0, 1]``; default ``0.01, 0.02, ..., 0.99``.
        vote_windows: candidate half-widths ``K >= 0`` (``0`` = no vote).
        vote_fractions: candidate fractions ``p`` in ``(0, 1]``.
        per_au: choose per AU instead of one global choice.
        segment_ids: optional integer ``[N]``; rows sharing an id form one continuous sequence
            (consecutive rows) and votes never cross segments. ``None`` = one sequence.
        zero_division: value of an undefined F1 (see :func:`au_f1`).

    Returns:
        ``{"per_au": Tensor[M], "mean": float, "threshold", "vote_window", "vote_fraction"`` (floats/
        ints, or Tensors ``[M]`` when ``per_au``), ``"optimistic": True, "note": str}``.
    """
    _check_probs(probs)
    tgt = _binary_target(target, probs.shape)
    n, m = probs.shape
    if n == 0:
        raise ValueError(f"probs must hold at least one frame (expected N >= 1, got shape {tuple(probs.shape)})")
    ths = [i / 100 for i in range(1, 100)] if thresholds is None else [_check_threshold(t) for t in thresholds]
    ks = sorted({int(k) for k in vote_windows})
    ps = [float(p) for p in vote_fractions]
    if not ths or not ks or not ps:
        raise ValueError(
            "thresholds, vote_windows and vote_fractions must be non-empty "
            f"(expected at least one candidate each, got {len(ths)}, {len(ks)}, {len(ps)})"
        )
    if ks[0] < 0:
        raise ValueError(f"vote_windows must be half-widths (expected K >= 0, got {list(vote_windows)})")
    if any(not 0.0 < p <= 1.0 for p in ps):
        raise ValueError(f"vote_fractions are out of range (expected values in (0, 1], got {ps})")
    # preference order used for tie-breaking
    ths = sorted(set(ths), key=lambda t: (abs(t - 0.5), t))
    ps = sorted(set(ps), key=lambda p: (abs(p - 0.5), p))
    dev = probs.device
    th_t = torch.tensor(ths, dtype=probs.dtype, device=dev)
    binary = probs.unsqueeze(0) >= th_t[:, None, None]  # [H, N, M]
    starts, ends = _segment_bounds(segment_ids, n, dev)
    rows = torch.arange(n, device=dev)
    n_pos = tgt.sum(0)
    f1_grid, rules = [], []
    for k in ks:
        counts = torch.zeros(binary.shape, dtype=torch.int32, device=dev)
        for off in range(-k, k + 1):
            idx = torch.minimum(torch.maximum(rows + off, starts), ends)
            counts += binary[:, idx, :]
        w = 2 * k + 1
        for p in ps:
            pred = counts >= p * w
            tp = (pred & tgt).sum(1)
            fp = pred.sum(1) - tp
            f1_grid.append(_f1_from_counts(tp, fp, n_pos - tp, zero_division))  # [H, M]
            rules.append((k, p))
    grid = torch.stack(f1_grid).cpu()  # [R, H, M]
    n_rules, n_th = grid.shape[:2]
    if not per_au:
        score = torch.tensor([[_nanmean(grid[r, h]) for h in range(n_th)] for r in range(n_rules)])
        best = int(torch.nan_to_num(score, nan=-math.inf).flatten().argmax())
        r, h = divmod(best, n_th)
        res = grid[r, h]
        out: dict[str, object] = {
            "per_au": res,
            "mean": _nanmean(res),
            "threshold": ths[h],
            "vote_window": rules[r][0],
            "vote_fraction": rules[r][1],
        }
    else:
        # An undefined F1 only happens for an AU without positive labels when nothing is predicted
        # positive -- the best possible outcome for that AU -- so it ranks above every defined value.
        flat = torch.nan_to_num(grid, nan=math.inf).reshape(n_rules * n_th, m)
        best = flat.argmax(0)
        r_idx, h_idx = best // n_th, best % n_th
        res = grid[r_idx, h_idx, torch.arange(m)]
        out = {
            "per_au": res,
            "mean": _nanmean(res),
            "threshold": torch.tensor([ths[int(h)] for h in h_idx], dtype=torch.float64),
            "vote_window": torch.tensor([rules[int(r)][0] for r in r_idx]),
            "vote_fraction": torch.tensor([rules[int(r)][1] for r in r_idx], dtype=torch.float64),
        }
    out["optimistic"] = True
    out["note"] = OPTIMISTIC_NOTE
    return out


# --------------------------------------------------------------------------------------------------
# expression metrics
# --------------------------------------------------------------------------------------------------


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Confusion counts ``C[i, j]`` = #samples with target ``i`` predicted as ``j`` (rows = target).

    Args:
        pred: ``[N]`` class indices or ``[N, K]`` scores (argmax; ties -> lowest index).
        target: ``[N]`` class indices in ``[0, K)``.
        num_classes: ``K``.

    Returns:
        ``int64 Tensor[K, K]`` on the inputs' device.
    """
    k = _check_num_classes(num_classes)
    p = _class_pred(pred, k)
    t = _class_target(target, p.shape[0], k).to(p.device)
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


def _recall_from_cm(cm: Tensor) -> Tensor:
    cm = cm.double().cpu()
    support = cm.sum(1)
    return torch.where(support > 0, cm.diagonal() / support.clamp_min(1), torch.full_like(support, math.nan))


def per_class_recall(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Recall (per-class accuracy) of each class; NaN for classes absent from ``target``.

    Args:
        pred: ``[N]`` class indices or ``[N, K]`` scores.
        target: ``[N]`` class indices.
        num_classes: ``K``.

    Returns:
        float64 ``Tensor[K]`` (CPU).
    """
    return _recall_from_cm(confusion_matrix(pred, target, num_classes))


def uar(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted average recall: mean recall over the classes present in ``target``.

    Classes without support are ignored (not counted as 0 or 1).

    Args:
        pred: ``[N]`` class indices or ``[N, K]`` scores.
        target: ``[N]`` class indices.
        num_classes: ``K``.

    Returns:
        UAR in ``[0, 1]``.

    Examples::

        >>> uar(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]), num_classes=3)
        0.8333333333333333
    """
    rec = per_class_recall(pred, target, num_classes)
    if bool(torch.isnan(rec).all()):
        raise ValueError("uar needs at least one sample (expected N >= 1, got N=0)")
    return _nanmean(rec)


def war(pred: Tensor, target: Tensor) -> float:
    """Weighted average recall = accuracy over all samples.

    Args:
        pred: ``[N]`` class indices or ``[N, K]`` scores.
        target: ``[N]`` class indices.

    Returns:
        WAR in ``[0, 1]``.
    """
    p = _class_pred(pred, None)
    t = _class_target(target, p.shape[0], None).to(p.device)
    if p.numel() == 0:
        raise ValueError("war needs at least one sample (expected N >= 1, got N=0)")
    return float((p == t).double().mean())


def seen_unseen_curve(logits: Tensor, target: Tensor, unseen: Sequence[int]) -> dict[str, object]:
    """Generalised zero-shot evaluation without choosing a calibration: the seen-unseen curve and
    the area under it (AUSUC; Chao et al., "An empirical study and analysis of generalized
    zero-shot learning for object recognition in the wild", ECCV 2016).

    A constant ``gamma`` subtracted from every seen class's logit moves predictions from seen to
    unseen classes; sweeping it from ``-inf`` (every clip given its best seen class) to ``+inf``
    (its best unseen class) traces the unseen-class UAR (x) against the seen-class UAR (y).
    ``gamma = 0`` is the plain argmax. UARs are means of per-class recall over the classes with
    test samples of each group. Every reachable point is returned (ties in the score gap move
    together), so the area is exact, not sampled.

    Args:
        logits: ``[N, K]`` class scores (any monotone per-clip shift cancels; logits or
            log-probabilities, not probabilities of different temperature).
        target: ``[N]`` class indices in ``[0, K)``.
        unseen: the unseen class ids (distinct, a non-empty proper subset of ``range(K)``).

    Returns:
        ``{"ausuc": float, "unseen_uar": Tensor[P], "seen_uar": Tensor[P], "gamma": Tensor[P],
        "seen_uar_at_0": float, "unseen_uar_at_0": float}``: the curve's points in order of
        increasing ``gamma`` (the smallest shift that reaches each point; ``-inf`` first: every
        sample given its best seen class; a sample moves to its best unseen class once
        ``gamma >= best seen logit - best unseen logit``), float64 on the CPU.

    Raises:
        ValueError: bad shapes or ids, or no test sample of a seen or of an unseen class.

    Examples::

        >>> logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.5], [1.0, 0.0, 0.5]])
        >>> seen_unseen_curve(logits, torch.tensor([0, 1, 2]), unseen=[2])["ausuc"]
        0.75
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a float Tensor [N, K], got {_desc(logits)}")
    n, k = logits.shape
    t = _class_target(target, n, k).cpu()
    ids = [int(c) for c in unseen]
    if not ids or len(set(ids)) != len(ids) or any(not 0 <= c < k for c in ids) or len(ids) == k:
        raise ValueError(f"unseen: expected distinct class ids in [0, {k}), at least one and not all, got {ids}")
    z = logits.detach().double().cpu()
    is_unseen = torch.zeros(k, dtype=torch.bool)
    is_unseen[ids] = True
    seen_ids = (~is_unseen).nonzero().flatten()
    unseen_ids = is_unseen.nonzero().flatten()
    s_val, s_arg = z[:, seen_ids].max(1)
    u_val, u_arg = z[:, unseen_ids].max(1)
    best_seen, best_unseen = seen_ids[s_arg], unseen_ids[u_arg]
    support = torch.bincount(t, minlength=k).double()
    lab_unseen = is_unseen[t]
    n_seen_cls = int((support[seen_ids] > 0).sum())
    n_unseen_cls = int((support[unseen_ids] > 0).sum())
    if n_seen_cls == 0 or n_unseen_cls == 0:
        raise ValueError(f"seen_unseen_curve needs test samples of seen and of unseen classes (expected both, got "
                         f"{n_seen_cls} seen and {n_unseen_cls} unseen classes with samples)")
    # each sample's share of its group's UAR when it is classified correctly
    w = 1.0 / support[t]
    credit_seen = torch.where(~lab_unseen & (best_seen == t), w / n_seen_cls, torch.zeros(n, dtype=torch.float64))
    credit_unseen = torch.where(lab_unseen & (best_unseen == t), w / n_unseen_cls, torch.zeros(n, dtype=torch.float64))
    gap = s_val - u_val  # a sample goes to its best unseen class once gamma >= gap
    order = torch.argsort(gap)
    g = gap[order]
    cs, cu = credit_seen[order], credit_unseen[order]
    # after the first j samples (in gap order) moved to unseen: unseen credit = cumsum, seen = rest
    cu_cum = torch.cat([torch.zeros(1, dtype=torch.float64), cu.cumsum(0)])
    cs_rest = torch.cat([cs.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    ends = torch.cat([torch.tensor([0]), (torch.nonzero(g[1:] != g[:-1]).flatten() + 1), torch.tensor([n])])
    x, y = cu_cum[ends], cs_rest[ends]
    # the smallest gamma that reaches each point (-inf: nothing moved yet)
    gam = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), g[ends[1:] - 1]])
    area = float(torch.trapezoid(y, x))
    at0 = int((g <= 0).sum())  # gamma = 0: the plain argmax (an exact tie goes to the unseen class)
    return {"ausuc": area, "unseen_uar": x, "seen_uar": y, "gamma": gam,
            "seen_uar_at_0": float(cs[at0:].sum()), "unseen_uar_at_0": float(cu[:at0].sum())}


# --------------------------------------------------------------------------------------------------
# streaming meters
# --------------------------------------------------------------------------------------------------


def _dist_on(group: object | None) -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(group: object | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(t: Tensor, group: object | None) -> Tensor:
    dev = _comm_device(group)
    buf = t.to(dev, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def _all_gather_rows(t: Tensor, group: object | None) -> Tensor:
    """Concatenate ``[n_r, ...]`` tensors of all ranks in rank order (n_r may differ)."""
    dev = _comm_device(group)
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_i = [int(s) for s in sizes]
    buf = torch.zeros((max(sizes_i),) + tuple(t.shape[1:]), dtype=t.dtype, device=dev)
    buf[: t.shape[0]] = t.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes_i)]).to(t.device)


class AUMeter:
    """Streaming AU metrics: F1 at a fixed threshold (from counts) and AUC (from stored scores).

    ``update`` accumulates; ``compute`` returns the metrics over everything seen so far (identical
    to :func:`au_f1` / :func:`au_auc` on the concatenated inputs) without changing the state. When
    ``torch.distributed`` is initialised, ``compute`` sums counts with ``all_reduce`` and gathers
    scores from every rank (NCCL: via the current CUDA device; other backends: via CPU). Samples
    duplicated by a ``DistributedSampler`` are counted twice, as in torchmetrics.

    Args:
        num_aus: ``M``.
        threshold: F1 threshold (``prob >= threshold`` is positive).
        store_scores: keep probabilities for AUC (memory ``O(N * M)``); if False, AUC is ``None``.
        zero_division: value of an undefined F1 (default NaN, see :func:`au_f1`).
        process_group: process group to reduce over (default: the world).

    Examples::

        >>> meter = AUMeter(num_aus=12)
        >>> for logits, y in batches:  # logits [B, T, 12] or [B, 12]
        ...     meter.update(logits.sigmoid(), y, mask=valid_frames)
        >>> meter.compute()["f1"]
    """

    def __init__(
        self,
        num_aus: int,
        threshold: float = 0.5,
        *,
        store_scores: bool = True,
        zero_division: float = math.nan,
        process_group: object | None = None,
    ) -> None:
        if not isinstance(num_aus, int) or isinstance(num_aus, bool) or num_aus < 1:
            raise ValueError(f"num_aus must be a positive int (expected an int >= 1, got {num_aus!r})")
        self.num_aus = num_aus
        self.threshold = _check_threshold(threshold)
        self.store_scores = bool(store_scores)
        self.zero_division = float(zero_division)
        self.process_group = process_group
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._tp = torch.zeros(self.num_aus, dtype=torch.long)
        self._fp = torch.zeros(self.num_aus, dtype=torch.long)
        self._fn = torch.zeros(self.num_aus, dtype=torch.long)
        self._n = torch.zeros((), dtype=torch.long)
        self._probs: list[Tensor] = []
        self._targets: list[Tensor] = []

    @torch.no_grad()
    def update(self, probs: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            probs: ``[..., M]`` probabilities (e.g. ``[B, M]`` or ``[B, T, M]``).
            target: same shape, binary.
            mask: optional bool with the leading shape of ``probs`` (e.g. ``[B]`` or ``[B, T]``);
                True = this frame counts (padded / unlabelled frames: False).
        """
        _check_probs(probs, min_dims=1)
        if probs.shape[-1] != self.num_aus:
            raise ValueError(f"probs have the wrong shape (expected [..., M={self.num_aus}], got {tuple(probs.shape)})")
        tgt = _binary_target(target, probs.shape)
        p2, t2 = probs.detach().reshape(-1, self.num_aus), tgt.reshape(-1, self.num_aus)
        if mask is not None:
            lead = tuple(probs.shape[:-1])
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != lead[: mask.ndim]:
                raise ValueError(
                    f"mask has the wrong shape or dtype (expected a bool Tensor of shape {lead}, got {_desc(mask)})"
                )
            keep = mask.reshape(tuple(mask.shape) + (1,) * (len(lead) - mask.ndim)).expand(lead).reshape(-1)
            keep = keep.to(p2.device)
            p2, t2 = p2[keep], t2[keep]
        tp, fp, fn = _au_counts(p2, t2, self.threshold)
        dev = p2.device
        if self._tp.device != dev:
            self._tp, self._fp, self._fn, self._n = (x.to(dev) for x in (self._tp, self._fp, self._fn, self._n))
        self._tp += tp
        self._fp += fp
        self._fn += fn
        self._n += p2.shape[0]
        if self.store_scores:
            self._probs.append(p2.double())
            self._targets.append(t2.clone())

    @torch.no_grad()
    def compute(self) -> dict[str, object]:
        """Metrics over all updates (all ranks when distributed).

        Returns:
            ``{"f1": float, "f1_per_au": Tensor[M], "auc": float | None, "auc_per_au": Tensor[M] |
            None, "threshold": float, "num_samples": int}`` (per-AU tensors: float64 on CPU).
        """
        tp, fp, fn, n = self._tp, self._fp, self._fn, self._n
        probs = targets = None
        if self.store_scores:
            dev = tp.device
            empty = (0, self.num_aus)
            probs = torch.cat(self._probs) if self._probs else torch.zeros(empty, dtype=torch.float64, device=dev)
            targets = torch.cat(self._targets) if self._targets else torch.zeros(empty, dtype=torch.bool, device=dev)
        if _dist_on(self.process_group):
            g = self.process_group
            tp, fp, fn, n = (_all_reduce_sum(x, g) for x in (tp, fp, fn, n))
            if probs is not None:
                probs = _all_gather_rows(probs, g)
                targets = _all_gather_rows(targets.to(torch.uint8), g).bool()
        if int(n) == 0:
            raise ValueError("AUMeter.compute() called before any sample was added with update() (expected >= 1 sample, got 0)")
        f1 = _f1_from_counts(tp, fp, fn, self.zero_division).cpu()
        out: dict[str, object] = {"f1": _nanmean(f1), "f1_per_au": f1, "auc": None, "auc_per_au": None}
        if probs is not None:
            auc = au_auc(probs, targets)
            out["auc"], out["auc_per_au"] = auc["mean"], auc["per_au"]
        out["threshold"] = self.threshold
        out["num_samples"] = int(n)
        return out

    def __repr__(self) -> str:
        return f"AUMeter(num_aus={self.num_aus}, threshold={self.threshold}, store_scores={self.store_scores})"


class ExpressionMeter:
    """Streaming expression metrics from an accumulated confusion matrix (UAR, WAR, per-class recall).

    ``compute`` all-reduces the confusion matrix when ``torch.distributed`` is initialised.

    Args:
        num_classes: ``K``.
        process_group: process group to reduce over (default: the world).
    """

    def __init__(self, num_classes: int, *, process_group: object | None = None) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.process_group = process_group
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` ``[N]`` class indices or ``[N, K]`` scores, ``target`` ``[N]``."""
        cm = confusion_matrix(pred, target, self.num_classes)
        if self._cm.device != cm.device:
            self._cm = self._cm.to(cm.device)
        self._cm += cm

    @torch.no_grad()
    def compute(self) -> dict[str, object]:
        """Metrics over all updates (all ranks when distributed).

        Returns:
            ``{"uar": float, "war": float, "per_class_recall": Tensor[K] (NaN = no support),
            "confusion_matrix": int64 Tensor[K, K] (rows = target), "num_samples": int}`` on CPU.
        """
        cm = self._cm
        if _dist_on(self.process_group):
            cm = _all_reduce_sum(cm, self.process_group)
        cm = cm.cpu()
        n = int(cm.sum())
        if n == 0:
            raise ValueError("ExpressionMeter.compute() called before any sample was added with update() (expected >= 1 sample, got 0)")
        rec = _recall_from_cm(cm)
        return {
            "uar": _nanmean(rec),
            "war": float(cm.diagonal().sum()) / n,
            "per_class_recall": rec,
            "confusion_matrix": cm,
            "num_samples": n,
        }

    def __repr__(self) -> str:
        return f"ExpressionMeter(num_classes={self.num_classes})"
