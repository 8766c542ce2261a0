"""Synthetic FACS face-video benchmark: procedural faces whose AUs are visible deformations.

* :mod:`.render` -- vectorised torch renderer (:func:`render_faces`, :func:`sample_identities`).
* :mod:`.domains` -- lab-like AU sequences (:func:`generate_lab_sequences`) and wild-like
  expression clips (:func:`generate_wild_clips`), deterministic by seed.
* :mod:`.datasets` -- :class:`SyntheticExpressionDataset`, :class:`SyntheticAUDataset` (same items
  as the real clip datasets) with ``export`` to real DFEW / BP4D / DISFA manifests + PNG frames.
* :mod:`.figure` -- :func:`make_figure` (``python -m facelayers.data.synthetic --figure out.png``).
* :mod:`.captions` -- FACS captions of lab frames (:func:`caption_frames`, :func:`caption_positives`,
  :func:`generate_captioned_frames`).
* :mod:`.pretrain` -- contrastive pretraining of the tiny CLIP on them (:func:`pretrain_tiny_clip`,
  :class:`MultiPositiveClipLoss`; ``python -m facelayers.data.synthetic pretrain-clip --out FILE``).

See ``docs/synthetic.md``. It tests learnability and plumbing; it is not evidence about real faces.
"""

from __future__ import annotations

from .captions import (
    PRETRAIN_SEED_OFFSET,
    Caption,
    CaptionedFrames,
    caption_for,
    caption_frames,
    caption_positives,
    generate_captioned_frames,
    named_mask,
)
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
from .pretrain import MultiPositiveClipLoss, PretrainRecipe, multi_positive_clip_loss, pretrain_tiny_clip
from .render import AU_DEFORMATIONS, RENDERED_AUS, neutral_pose, plain_scenes, render_faces, sample_identities

__all__ = [
    "AU_ACTIVE_THRESHOLD",
    "AU_DEFORMATIONS",
    "Caption",
    "CaptionedFrames",
    "MultiPositiveClipLoss",
    "PRETRAIN_SEED_OFFSET",
    "PretrainRecipe",
    "DFEW_CLASS_FREQUENCIES",
    "LabSequences",
    "RENDERED_AUS",
    "SyntheticAUDataset",
    "SyntheticExpressionDataset",
    "WildClips",
    "caption_for",
    "caption_frames",
    "caption_positives",
    "generate_captioned_frames",
    "generate_lab_sequences",
    "generate_wild_clips",
    "make_figure",
    "multi_positive_clip_loss",
    "named_mask",
    "neutral_pose",
    "plain_scenes",
    "pretrain_tiny_clip",
    "render_faces",
    "sample_identities",
]
