"""The sample picture of docs/synthetic.md: per-AU apex frames next to neutral, and expressions."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import facs
from .domains import generate_wild_clips, item_generator
from .render import RENDERED_AUS, render_au_apexes, render_faces, sample_identities

__all__ = ["make_figure", "sample_grid"]


def sample_grid(*, image_size: int = 64, seed: int = 0, num_identities: int = 2,
                expressions: Sequence[str] = facs.EXPRESSIONS_7) -> tuple[Tensor, Tensor, Tensor]:
    """Frames for the figure.

    Returns:
        ``(au_frames [I, 1 + A, 3, S, S], expr_frames [K, 3, S, S], expr_wild [K, 3, S, S])``: per
        identity the neutral face then each rendered AU at intensity 1 (lab scene); each expression
        as its clean Table S4 composition at apex (lab scene, identity 0); and a wild clip's last
        frame per expression (noise, pose, clutter).
    """
    g = item_generator(seed, 9, 0)
    ids = sample_identities(num_identities, generator=g)
    au_frames = render_au_apexes(ids, image_size=image_size)
    K = len(expressions)
    comp = torch.zeros(K, len(RENDERED_AUS))
    for k, e in enumerate(expressions):
        for a in facs.EXPRESSIONS[e].aus:
            comp[k, RENDERED_AUS.index(a)] = 1.0
    idn = {k: v[:1].expand(K, *v.shape[1:]) for k, v in ids.items()}
    clean = render_faces(idn, comp, image_size=image_size)
    wild = generate_wild_clips(list(range(K)), list(range(K)), expressions=expressions, num_frames=8,
                               image_size=image_size, seed=seed)
    return au_frames, clean, wild.frames[:, -1].float() / 255.0


def make_figure(path: str | os.PathLike[str] | None = None, *, image_size: int = 64, seed: int = 0,
                expressions: Sequence[str] = facs.EXPRESSIONS_7):
    """Draw the sample figure (needs matplotlib); write a PNG to ``path`` when given.

    Returns:
        The matplotlib Figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("make_figure needs matplotlib: pip install matplotlib") from e
    au_frames, clean, wild = sample_grid(image_size=image_size, seed=seed, expressions=expressions)
    n_id, n_col = au_frames.shape[0], au_frames.shape[1]
    K = clean.shape[0]
    n_rows = n_id + 2
    cols = max(n_col, K)
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 0.95, n_rows * 1.15))
    for ax in axes.flat:
        ax.axis("off")
    titles = ["neutral"] + [f"AU{a}" for a in RENDERED_AUS]
    for i in range(n_id):
        for j in range(n_col):
            axes[i, j].imshow(au_frames[i, j].permute(1, 2, 0).numpy())
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=7)
    for k in range(K):
        axes[n_id, k].imshow(clean[k].permute(1, 2, 0).numpy())
        axes[n_id, k].set_title(expressions[k], fontsize=7)
        axes[n_id + 1, k].imshow(wild[k].permute(1, 2, 0).numpy())
        axes[n_id + 1, k].set_title(f"{expressions[k]} (wild)", fontsize=6)
    fig.suptitle("facelayers synthetic FACS faces: AU apex vs neutral (lab), expressions (lab, wild)", fontsize=8)
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
