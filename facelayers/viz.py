"""Plots for facelayers models and runs (needs the ``plot`` extra: matplotlib).

matplotlib is imported lazily, inside each function, so ``import facelayers.viz`` never fails; a
call without matplotlib raises an :class:`ImportError` that says how to install it. Every function
returns the :class:`matplotlib.figure.Figure` and, given ``path``, also writes a PNG there and
closes the figure (so long training runs do not accumulate open figures).

Plots:

* :func:`plot_dpm_maps` -- the Dynamic Prior Mapping matrices ``A = W^{au->exp}`` ``[K, M]`` and
  ``B = W^{exp->au}`` ``[M, K]`` side by side for several states (initial, learned from random,
  learned from prior), laid out like Fig. 7 of the SSM paper (top row A, bottom row B).
* :func:`plot_au_timeline` -- per-frame AU probabilities of a video as a heat strip plus curves.
* :func:`plot_confusion_matrix` -- expression confusion matrix (row-normalised by default).
* :func:`plot_training_curves` -- loss / metric curves from a run's history.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "plot_au_timeline",
    "plot_confusion_matrix",
    "plot_dpm_maps",
    "plot_training_curves",
]


def _pyplot() -> Any:
    """Import matplotlib lazily with a non-interactive backend, or raise a helpful ImportError."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "facelayers.viz needs matplotlib, which is not installed; "
            "install the plot extra: pip install 'facelayers[plot]' (or pip install matplotlib)"
        ) from err
    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_2d(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(t.shape)}")
    return t


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        fig.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
        _pyplot().close(fig)
    return fig


def _au_label(a: Any) -> str:
    if isinstance(a, int):
        return f"AU{a}"
    return str(a)


def plot_dpm_maps(
    panels: Mapping[str, tuple[Any, Any]],
    expression_names: Sequence[str],
    au_names: Sequence[int | str],
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    annotate: bool | None = None,
    cmap: str = "viridis",
) -> Any:
    """Heatmaps of DPM maps, one column per state, like the SSM paper's Fig. 7.

    Args:
        panels: ordered mapping ``column title -> (A, B)`` with ``A: [K, M]`` (AU -> expression,
            rows = expressions) and ``B: [M, K]`` (expression -> AU, rows = AUs), e.g.
            ``{"initial": dpm_init.maps(), "learned": dpm.maps()}``.
        expression_names: ``K`` row labels of ``A``.
        au_names: ``M`` AU codes (ints are shown as ``AU{n}``) or labels.
        path: optional PNG path.
        title: optional figure title.
        annotate: write values in the cells (default: only when ``K * M <= 150``).
        cmap: matplotlib colormap.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: no panels, or a matrix whose shape is not ``[K, M]`` / ``[M, K]``.
    """
    if not panels:
        raise ValueError("plot_dpm_maps: expected at least one (A, B) panel, got none")
    k, m = len(expression_names), len(au_names)
    aus = [_au_label(a) for a in au_names]
    mats = {}
    for name, (a, b) in panels.items():
        a2, b2 = _as_2d(a, f"{name}.A"), _as_2d(b, f"{name}.B")
        if tuple(a2.shape) != (k, m):
            raise ValueError(f"plot_dpm_maps: panel {name!r} A expected shape {(k, m)} [K, M], got {tuple(a2.shape)}")
        if tuple(b2.shape) != (m, k):
            raise ValueError(f"plot_dpm_maps: panel {name!r} B expected shape {(m, k)} [M, K], got {tuple(b2.shape)}")
        mats[name] = (a2, b2)
    if annotate is None:
        annotate = k * m <= 150
    plt = _pyplot()
    ncol = len(mats)
    fig, axes = plt.subplots(
        2, ncol, figsize=(max(3.2, 0.42 * m + 1.6) * ncol, 0.42 * (k + m) + 2.4), squeeze=False,
        gridspec_kw=dict(height_ratios=[max(k, 1), max(m, 1)]),
    )
    for j, (name, (a, b)) in enumerate(mats.items()):
        for i, (mat, rows, cols, label) in enumerate(
            [(a, list(expression_names), aus, "AU → expression"), (b, aus, list(expression_names), "expression → AU")]
        ):
            ax = axes[i][j]
            im = ax.imshow(mat.numpy(), cmap=cmap, aspect="auto", vmin=0.0, vmax=max(float(mat.max()), 1e-8))
            ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_title(f"{name}\n{label}" if i == 0 else label, fontsize=8)
            if annotate:
                vmax = float(mat.max()) or 1.0
                for r in range(mat.shape[0]):
                    for c in range(mat.shape[1]):
                        v = float(mat[r, c])
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5,
                                color="white" if v < 0.6 * vmax else "black")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_au_timeline(
    probs: Any,
    au_names: Sequence[int | str],
    *,
    fps: float | None = None,
    threshold: float = 0.5,
    labels: Any | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Any:
    """AU probabilities over a video: a heat strip (AUs x time) and per-AU curves.

    Args:
        probs: ``[T, M]`` per-frame AU probabilities in ``[0, 1]``; NaN rows (e.g. frames where
            no face was found) are drawn as gaps: grey cells in the heat strip, breaks in the curves.
        au_names: ``M`` AU codes or labels.
        fps: frames per second for a time axis in seconds (frame index when ``None``).
        threshold: decision threshold drawn on the curves.
        labels: optional ``[T, M]`` ground truth (0/1) drawn as markers on the strip.
        path: optional PNG path.
        title: optional title.

    Returns:
        The matplotlib figure.
    """
    p = _as_2d(probs, "probs")
    t_len, m = p.shape
    if m != len(au_names):
        raise ValueError(f"plot_au_timeline: probs has {m} AU columns but {len(au_names)} au_names were given")
    if labels is not None:
        lab = _as_2d(labels, "labels")
        if lab.shape != p.shape:
            raise ValueError(f"plot_au_timeline: labels shape {tuple(lab.shape)} != probs shape {tuple(p.shape)}")
    aus = [_au_label(a) for a in au_names]
    x = torch.arange(t_len, dtype=torch.float64)
    if fps:
        x = x / float(fps)
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(max(6.0, min(18.0, 0.06 * t_len + 5)), 1.2 + 0.35 * m * 2),
                                   sharex=True, gridspec_kw=dict(height_ratios=[1, 1.3]))
    extent = (float(x[0]) - 0.5 * (float(x[1] - x[0]) if t_len > 1 else 0.5),
              float(x[-1]) + 0.5 * (float(x[1] - x[0]) if t_len > 1 else 0.5), m - 0.5, -0.5)
    heat = plt.get_cmap("magma").with_extremes(bad="lightgray")  # NaN = no value (no face in that frame)
    im = ax0.imshow(p.T.numpy(), aspect="auto", cmap=heat, vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
    ax0.set_yticks(range(m), aus, fontsize=7)
    if labels is not None:
        rr, cc = torch.nonzero(lab.T > 0.5, as_tuple=True)
        ax0.scatter(x[cc].numpy(), rr.numpy(), s=4, c="cyan", marker="s", label="label")
        ax0.legend(loc="upper right", fontsize=6)
    fig.colorbar(im, ax=ax0, fraction=0.03, pad=0.01)
    cmap = plt.get_cmap("tab20")
    for j in range(m):
        ax1.plot(x.numpy(), p[:, j].numpy(), color=cmap(j % 20), lw=1.0, label=aus[j])
    ax1.axhline(threshold, color="gray", ls="--", lw=0.8)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("P(AU active)")
    ax1.set_xlabel("time [s]" if fps else "frame")
    ax1.legend(ncol=1 if m <= 12 else 2, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax0.set_title(title or "AU timeline", fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    *,
    normalize: bool = True,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Any:
    """Confusion matrix heatmap (rows = true class, columns = predicted class).

    Args:
        cm: ``[K, K]`` counts.
        class_names: ``K`` names.
        normalize: divide each row by its support (rows without support stay 0); the count is
            shown in the cell either way.
        path: optional PNG path.
        title: optional title.
    """
    c = _as_2d(cm, "cm")
    k = len(class_names)
    if tuple(c.shape) != (k, k):
        raise ValueError(f"plot_confusion_matrix: expected a [{k}, {k}] matrix for {k} classes, got {tuple(c.shape)}")
    support = c.sum(1, keepdim=True)
    shown = torch.where(support > 0, c / support.clamp_min(1e-12), torch.zeros_like(c)) if normalize else c
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.5 * k + 2.0))
    im = ax.imshow(shown.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(float(c.max()), 1.0))
    ax.set_xticks(range(k), list(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    vmax = float(shown.max()) or 1.0
    for r in range(k):
        for col in range(k):
            v = float(shown[r, col])
            txt = f"{v:.2f}\n({int(c[r, col])})" if normalize else f"{int(c[r, col])}"
            ax.text(col, r, txt, ha="center", va="center", fontsize=6, color="white" if v > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"), fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
    *,
    x_key: str = "epoch",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Any:
    """One subplot per logged quantity (losses, validation metrics) against ``x_key``.

    Args:
        history: a list of records (``[{"epoch": 1, "loss": 0.7, "val/uar": 0.4}, ...]``) or a
            mapping ``name -> values``. Missing or non-finite values are skipped per series.
        x_key: the record key used as x axis (falls back to the record index).
        path: optional PNG path.
        title: optional title.
    """
    if isinstance(history, Mapping):
        n = max((len(v) for v in history.values()), default=0)
        records = [{k: v[i] for k, v in history.items() if i < len(v)} for i in range(n)]
    else:
        records = [dict(r) for r in history]
    if not records:
        raise ValueError("plot_training_curves: history is empty")
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k != x_key and k not in keys and isinstance(v, (int, float)):
                keys.append(k)
    if not keys:
        raise ValueError(f"plot_training_curves: no numeric series besides {x_key!r} in history")
    plt = _pyplot()
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 2.6 * nrow), squeeze=False)
    for idx, k in enumerate(keys):
        ax = axes[idx // ncol][idx % ncol]
        xs, ys = [], []
        for i, r in enumerate(records):
            v = r.get(k)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                xs.append(float(r.get(x_key, i)))
                ys.append(float(v))
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, ms=3, lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.grid(alpha=0.3)
    for idx in range(len(keys), nrow * ncol):
        axes[idx // ncol][idx % ncol].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)
