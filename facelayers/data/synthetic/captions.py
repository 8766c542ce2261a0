"""FACS captions of synthetic lab frames, for contrastive pretraining of a tiny CLIP.

A frame is captioned with the FACS names of its active AUs (``facs.AUS[code].name``, Table S4
wording), in a random template and a shuffled order; with probability ``subset_p`` (default one
half) the caption names only a random non-empty subset of the active AUs. A frame with no active
AU gets a "relaxed face" caption. A caption never names an AU that is not active.

A caption is *true of* an image when every AU it names is active in the image (a "no AU" caption:
when no AU is active); :func:`caption_positives` builds that image x caption matrix, the target of
the multi-positive contrastive loss (:class:`~facelayers.data.synthetic.pretrain.MultiPositiveClipLoss`).

The frames come from :func:`~.domains.generate_lab_sequences` with every rendered AU labelled and
benchmark seeds offset by :data:`PRETRAIN_SEED_OFFSET`, so no pretraining identity or AU track is
one of the benchmark's (whose seeds are small integers, ``--data-seed`` default 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ... import facs
from .domains import generate_lab_sequences, item_generator
from .render import RENDERED_AUS

__all__ = [
    "CAPTION_TEMPLATES",
    "NEUTRAL_PHRASES",
    "PRETRAIN_SEED_OFFSET",
    "Caption",
    "CaptionedFrames",
    "caption_for",
    "caption_generator",
    "caption_frames",
    "caption_positives",
    "generate_captioned_frames",
    "named_mask",
]

#: Caption templates; ``{}`` receives the AU phrase list.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a face with {}",
    "a photo of a face with {}",
    "a face showing {}",
    "a person with {}",
    "facial action: {}",
    "a close-up of a face, {}",
)

#: Phrases for a frame with no active AU (filled into a template like an AU list).
NEUTRAL_PHRASES: tuple[str, ...] = ("relaxed facial muscles", "no action units", "a still face")

#: Added to the seed of the pretraining frames: the benchmark's subjects use seeds ``0, 1, ...``
#: with ids below a few thousand; :func:`~.domains.item_generator` mixes ``seed * 1_000_003 +
#: id * 104_729``, so seeds ``>= PRETRAIN_SEED_OFFSET`` can never meet a benchmark item's stream.
PRETRAIN_SEED_OFFSET: int = 1_000_000

_CAPTION_DOMAIN = 11  # item_generator domain of the caption draws (not used by the benchmark)


@dataclass(frozen=True)
class Caption:
    """One caption and the AUs it names (empty: a "no active AU" caption)."""

    text: str
    named: tuple[int, ...]


def _join(names: Sequence[str], g: torch.Generator) -> str:
    if len(names) == 1:
        return names[0]
    if float(torch.rand((), generator=g)) < 0.5:
        return ", ".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def caption_for(
    active: Sequence[int],
    generator: torch.Generator,
    *,
    subset_p: float = 0.5,
    templates: Sequence[str] = CAPTION_TEMPLATES,
) -> Caption:
    """A random caption of a frame whose active AUs are ``active``.

    Args:
        active: codes of the active AUs (any order; may be empty).
        generator: the random stream (template, subset, order, joiner).
        subset_p: probability of naming a random non-empty subset (each AU kept with p = 1/2)
            instead of all active AUs.
        templates: format strings with one ``{}``.

    Returns:
        :class:`Caption` whose ``named`` AUs are a non-empty subset of ``active`` (empty when
        ``active`` is).

    Raises:
        ValueError: ``subset_p`` outside ``[0, 1]``, no templates, or a template without ``{}``.
        UnknownLabelError: an unknown AU code.

    Examples::

        >>> c = caption_for([6, 12], torch.Generator().manual_seed(0))
        >>> set(c.named) <= {6, 12}
        True
    """
    if not 0.0 <= subset_p <= 1.0:
        raise ValueError(f"subset_p must be in [0, 1] (expected 0 <= p <= 1, got {subset_p!r})")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty format strings with one '{{}}' (got {list(templates)!r})")
    codes = list(facs.check_vocabulary(active, "au")) if len(active) else []
    template = templates[int(torch.randint(0, len(templates), (), generator=generator))]
    if not codes:
        phrase = NEUTRAL_PHRASES[int(torch.randint(0, len(NEUTRAL_PHRASES), (), generator=generator))]
        return Caption(template.format(phrase), ())
    if len(codes) > 1 and float(torch.rand((), generator=generator)) < subset_p:
        keep = torch.rand(len(codes), generator=generator) < 0.5
        if not bool(keep.any()):
            keep[int(torch.randint(0, len(codes), (), generator=generator))] = True
        codes = [c for c, k in zip(codes, keep.tolist()) if k]
    order = torch.randperm(len(codes), generator=generator).tolist()
    codes = [codes[i] for i in order]
    text = template.format(_join([facs.AUS[c].name for c in codes], generator))
    return Caption(text, tuple(codes))


def caption_frames(
    active: Tensor,
    aus: Sequence[int],
    generator: torch.Generator,
    *,
    subset_p: float = 0.5,
    templates: Sequence[str] = CAPTION_TEMPLATES,
) -> list[Caption]:
    """One random caption per frame.

    Args:
        active: ``[F, A]`` bool / 0-1 activity of the AUs ``aus``.
        aus: the ``A`` AU codes of the columns.
        generator: random stream (consumed frame by frame, so a seed gives the same captions).
        subset_p, templates: see :func:`caption_for`.

    Returns:
        ``F`` captions.
    """
    aus = facs.check_vocabulary(aus, "au")
    if active.dim() != 2 or active.shape[1] != len(aus):
        raise ValueError(f"active must be [F, {len(aus)}] for {len(aus)} AUs (expected [F, {len(aus)}], "
                         f"got {list(active.shape)})")
    rows = active.bool().tolist()
    return [
        caption_for([a for a, on in zip(aus, row) if on], generator, subset_p=subset_p, templates=templates)
        for row in rows
    ]


def named_mask(captions: Sequence[Caption], aus: Sequence[int]) -> Tensor:
    """``[C, A]`` bool: which of ``aus`` each caption names.

    Raises:
        ValueError: a caption names an AU outside ``aus``.
    """
    col = {int(a): j for j, a in enumerate(facs.check_vocabulary(aus, "au"))}
    out = torch.zeros(len(captions), len(col), dtype=torch.bool)
    for i, c in enumerate(captions):
        for a in c.named:
            if a not in col:
                raise ValueError(f"caption {i} names AU{a} (expected AUs among {sorted(col)}, got {list(c.named)})")
            out[i, col[a]] = True
    return out


def caption_positives(named: Tensor, active: Tensor) -> Tensor:
    """Which caption is true of which image.

    Caption ``j`` is true of image ``i`` when every AU it names is active in image ``i``; a caption
    naming no AU (a "relaxed face" caption) is true of the images with no active AU.

    Args:
        named: ``[C, A]`` bool, AUs named by each caption (:func:`named_mask`).
        active: ``[N, A]`` bool / 0-1, AUs active in each image.

    Returns:
        ``[N, C]`` bool.

    Examples::

        >>> named = torch.tensor([[1, 0], [1, 1], [0, 0]]).bool()
        >>> active = torch.tensor([[1, 1], [0, 0]]).bool()
        >>> caption_positives(named, active).int().tolist()
        [[1, 1, 0], [0, 0, 1]]
    """
    if named.dim() != 2 or active.dim() != 2 or named.shape[1] != active.shape[1]:
        raise ValueError(f"named [C, A] and active [N, A] must share A (expected two 2-D tensors with equal "
                         f"last dims, got {list(named.shape)} and {list(active.shape)})")
    named = named.bool()
    active = active.bool()
    # named AUs that the image lacks: [N, C]
    missing = (named[None, :, :] & ~active[:, None, :]).any(-1)
    neutral_caption = ~named.any(-1)  # [C]
    neutral_image = ~active.any(-1)  # [N]
    return torch.where(neutral_caption[None, :], neutral_image[:, None], ~missing)


@dataclass
class CaptionedFrames:
    """Lab frames with their AU activity, ready for caption sampling.

    Attributes:
        frames: ``[F, 3, H, W]`` uint8.
        active: ``[F, A]`` bool, AU intensity >= ``AU_ACTIVE_THRESHOLD``.
        aus: the ``A`` AU codes (``RENDERED_AUS``).
        subjects: ``[F]`` subject id of each frame.
    """

    frames: Tensor
    active: Tensor
    aus: tuple[int, ...]
    subjects: Tensor


def generate_captioned_frames(
    num_subjects: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    sequences_per_subject: int = 2,
    sequence_length: int = 64,
    aus: Sequence[int] = RENDERED_AUS,
) -> CaptionedFrames:
    """Render the pretraining frames: lab takes of ``num_subjects`` identities, all ``aus`` labelled.

    The lab generator runs with benchmark seed ``PRETRAIN_SEED_OFFSET + seed`` (disjoint from
    the benchmark's seeds, see :data:`PRETRAIN_SEED_OFFSET`).

    Returns:
        :class:`CaptionedFrames` with ``F = num_subjects * sequences_per_subject * sequence_length``.
    """
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    aus = tuple(int(a) for a in aus)
    data = generate_lab_sequences(
        list(range(num_subjects)),
        aus=aus,
        sequences_per_subject=sequences_per_subject,
        sequence_length=sequence_length,
        image_size=image_size,
        seed=PRETRAIN_SEED_OFFSET + int(seed),
        distractors=False,
    )
    subjects = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in zip(data.subjects, data.lengths)])
    return CaptionedFrames(frames=data.frames, active=data.labels.bool(), aus=aus, subjects=subjects)


def caption_generator(seed: int, step: int) -> torch.Generator:
    """The caption stream of one training step (independent of the frame sampling stream)."""
    return item_generator(PRETRAIN_SEED_OFFSET + int(seed), _CAPTION_DOMAIN, int(step))
