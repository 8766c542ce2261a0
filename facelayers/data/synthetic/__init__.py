"""Synthetic FACS face-video benchmark: procedural faces whose AUs are visible deformations.

* :mod:`.render` -- vectorised torch renderer (:func:`render_faces`, :func:`sample_identities`).
* :mod:`.domains` -- lab-like AU sequences (:func:`generate_lab_sequences`) and wild-like
  expression clips (:func:`generate_wild_clips`), deterministic by seed.
* :mod:`.datasets` -- :class:`SyntheticExpressionDataset`, :class:`SyntheticAUDataset` (same items
  as the real clip datasets) with ``export`` to real DFEW / BP4D / DISFA manifests + PNG frames.
* :mod:`.figure` -- :func:`make_figure` (``python -m facelayers.data.synthetic --figure out.png``).

See ``docs/synthetic.md``. It tests learnability and plumbing; it is not evidence about real faces.
"""

from __future__ import annotations

from .datasets import SyntheticAUDataset, SyntheticExpressionDataset
from .domains import (
    AU_ACTIVE_THRESHOLD,
    DFEW_CLASS_FREQUENCIES,
    LabSequences,
    WildClips,
    generate_lab_sequences,
    generate_wild_clips,
)
from .figure import make_figure
from .render import AU_DEFORMATIONS, RENDERED_AUS, neutral_pose, plain_scenes, render_faces, sample_identities

__all__ = [
    "AU_ACTIVE_THRESHOLD",
    "AU_DEFORMATIONS",
    "DFEW_CLASS_FREQUENCIES",
    "LabSequences",
    "RENDERED_AUS",
    "SyntheticAUDataset",
    "SyntheticExpressionDataset",
    "WildClips",
    "generate_lab_sequences",
    "generate_wild_clips",
    "make_figure",
    "neutral_pose",
    "plain_scenes",
    "render_faces",
    "sample_identities",
]
