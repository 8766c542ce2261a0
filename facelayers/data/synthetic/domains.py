"""The two synthetic domains: lab-like AU sequences and wild-like expression clips.

Every subject (AU domain) and every clip (expression domain) draws its parameters from its own
generator seeded by ``(seed, domain, id)``, so a split renders only its own items and any subset
of ids gives the same pixels as the full benchmark. Parameters are sampled first (cheap), then all
frames of a split are rendered in one vectorised pass (:func:`~.render.render_faces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ... import facs
from .render import RENDERED_AUS, neutral_pose, plain_scenes, render_faces, sample_identities

__all__ = [
    "AU_ACTIVE_THRESHOLD",
    "DFEW_CLASS_FREQUENCIES",
    "LabSequences",
    "WildClips",
    "assign_folds",
    "class_counts",
    "expression_labels",
    "generate_lab_sequences",
    "generate_wild_clips",
    "item_generator",
]

#: A frame label is active (1) when the AU's rendered intensity is >= this threshold.
AU_ACTIVE_THRESHOLD: float = 0.3

#: DFEW-like class proportions (7 classes, DFEW order: happiness, sadness, neutral, anger, surprise,
#: disgust, fear), close to the shares of the single-labelled DFEW clips except that disgust (about
#: 1.5% in DFEW) is raised to 3% so that a test fold of a few hundred clips holds enough disgust
#: clips for a stable recall. The 4 extra MAFW classes get 3% each when 11 expressions are used.
DFEW_CLASS_FREQUENCIES: dict[str, float] = {
    "happiness": 0.25,
    "sadness": 0.17,
    "neutral": 0.21,
    "anger": 0.17,
    "surprise": 0.10,
    "disgust": 0.03,
    "fear": 0.07,
    "contempt": 0.03,
    "anxiety": 0.03,
    "helplessness": 0.03,
    "disappointment": 0.03,
}

_LAB, _WILD, _LABELS = 1, 2, 3
_COL = {code: i for i, code in enumerate(RENDERED_AUS)}


def item_generator(seed: int, domain: int, item: int) -> torch.Generator:
    """Independent generator of one subject / clip: a fixed mix of ``(seed, domain, item)``."""
    mixed = (int(seed) * 1_000_003 + int(domain) * 7_919 + int(item) * 104_729 + 12_345) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _au_index(aus: Sequence[int]) -> list[int]:
    bad = [a for a in aus if a not in _COL]
    if bad:
        raise KeyError(f"AUs {bad} are not rendered; the synthetic benchmark renders {list(RENDERED_AUS)}")
    return [_COL[a] for a in aus]


# ---------------------------------------------------------------------------------------------
# lab domain


@dataclass
class LabSequences:
    """Rendered lab AU sequences of some subjects.

    Attributes:
        frames: ``[F, 3, H, W]`` uint8, all frames of all sequences concatenated.
        intensity: ``[F, A]`` float AU intensities (columns: ``RENDERED_AUS``).
        labels: ``[F, M]`` float 0/1 for ``aus`` (intensity >= :data:`AU_ACTIVE_THRESHOLD`).
        aus: the label vocabulary.
        starts, lengths, subjects, takes: per sequence: first frame row, length, subject id, take.
    """

    frames: Tensor
    intensity: Tensor
    labels: Tensor
    aus: tuple[int, ...]
    starts: list[int]
    lengths: list[int]
    subjects: list[int]
    takes: list[int]

    def labels_for(self, aus: Sequence[int]) -> Tensor:
        """``[F, len(aus)]`` 0/1 labels of any rendered AU vocabulary."""
        return (self.intensity[:, _au_index(aus)] >= AU_ACTIVE_THRESHOLD).float()


def _episodes(length: int, gap: tuple[int, int], g: torch.Generator) -> Tensor:
    """One AU's intensity track: onset-apex-offset episodes separated by random gaps."""
    track = torch.zeros(length)
    t = int(torch.randint(0, gap[1], (), generator=g))
    while t < length:
        onset = int(torch.randint(2, 6, (), generator=g))
        apex = int(torch.randint(4, 15, (), generator=g))
        offset = int(torch.randint(2, 6, (), generator=g))
        peak = 0.55 + 0.45 * float(torch.rand((), generator=g))
        ramp_up = torch.arange(1, onset + 1) / onset
        ramp_down = 1.0 - torch.arange(1, offset + 1) / (offset + 1)
        shape = torch.cat([ramp_up, torch.ones(apex), ramp_down]) * peak
        end = min(length, t + len(shape))
        track[t:end] = torch.maximum(track[t:end], shape[: end - t])
        t = end + int(torch.randint(gap[0], gap[1] + 1, (), generator=g))
    return track


def generate_lab_sequences(
    subjects: Sequence[int],
    *,
    aus: Sequence[int] = facs.BP4D_AUS,
    sequences_per_subject: int = 2,
    sequence_length: int = 64,
    image_size: int = 32,
    seed: int = 0,
    distractors: bool = True,
) -> LabSequences:
    """Render lab-like AU sequences: frontal faces, plain background, AU episodes.

    Each AU of ``aus`` gets onset-apex-offset episodes (2-5 frame ramps, 4-14 frame apex, peak
    intensity 0.55-1, 6-40 frame gaps), independent across AUs; with ``distractors`` the other
    rendered AUs get rarer episodes too (visible but unlabelled, as in real lab data).

    Args:
        subjects: subject ids (each id is one identity, the same for any call with this seed).
        aus: label vocabulary (e.g. ``facs.BP4D_AUS``, ``facs.DISFA_AUS``).
        sequences_per_subject: takes per subject (BP4D-like tasks).
        sequence_length: frames per take.
        image_size: pixels.
        seed: benchmark seed.
        distractors: add episodes of non-vocabulary AUs.
    """
    aus = tuple(int(a) for a in aus)
    _au_index(aus)
    if sequence_length < 1 or sequences_per_subject < 1:
        raise ValueError(
            f"sequence_length and sequences_per_subject must be >= 1, got {sequence_length}, {sequences_per_subject}"
        )
    id_rows, au_rows, pose_rows = [], [], []
    starts, lengths, subj, takes = [], [], [], []
    idents = []
    f = 0
    for k, s in enumerate(subjects):
        g = item_generator(seed, _LAB, s)
        idents.append(sample_identities(1, generator=g))
        for q in range(sequences_per_subject):
            inten = torch.zeros(sequence_length, len(RENDERED_AUS))
            for code in RENDERED_AUS:
                if code in aus:
                    inten[:, _COL[code]] = _episodes(sequence_length, (6, 40), g)
                elif distractors:
                    inten[:, _COL[code]] = _episodes(sequence_length, (40, 120), g)
            pose = neutral_pose(sequence_length)
            pose[:, 1] = 0.97 + 0.06 * float(torch.rand((), generator=g))
            pose[:, 2:4] = 0.06 * (torch.rand(2, generator=g) - 0.5)
            id_rows.append(torch.full((sequence_length,), k, dtype=torch.long))
            au_rows.append(inten)
            pose_rows.append(pose)
            starts.append(f)
            lengths.append(sequence_length)
            subj.append(int(s))
            takes.append(q)
            f += sequence_length
    if not idents:
        raise ValueError("generate_lab_sequences needs at least one subject")
    ident = {key: torch.cat([d[key] for d in idents]) for key in idents[0]}
    rows = torch.cat(id_rows)
    intensity = torch.cat(au_rows)
    frames = render_faces(
        {key: v[rows] for key, v in ident.items()},
        intensity,
        image_size=image_size,
        pose=torch.cat(pose_rows),
        scene=plain_scenes(len(rows)),
    )
    out = LabSequences(
        frames=_to_uint8(frames),
        intensity=intensity,
        labels=torch.zeros(0),
        aus=aus,
        starts=starts,
        lengths=lengths,
        subjects=subj,
        takes=takes,
    )
    out.labels = out.labels_for(aus)
    return out


def _to_uint8(frames: Tensor) -> Tensor:
    return (frames * 255.0).round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# wild domain


def class_counts(num_clips: int, expressions: Sequence[str], class_balance) -> list[int]:
    """Clips per class: ``num_clips`` split by the class frequencies, every class at least 5."""
    if isinstance(class_balance, str):
        if class_balance == "uniform":
            p = [1.0] * len(expressions)
        elif class_balance == "dfew":
            p = [DFEW_CLASS_FREQUENCIES.get(e, 0.03) for e in expressions]
        else:
            raise ValueError(f"class_balance must be 'dfew', 'uniform' or a sequence of weights, got {class_balance!r}")
    else:
        p = [float(v) for v in class_balance]
        if len(p) != len(expressions) or any(v < 0 for v in p) or sum(p) <= 0:
            raise ValueError(f"class_balance needs {len(expressions)} non-negative weights, got {class_balance!r}")
    if num_clips < 5 * len(expressions):
        raise ValueError(f"num_clips must be >= 5 per class ({5 * len(expressions)}), got {num_clips}")
    total = sum(p)
    counts = [max(5, int(num_clips * v / total)) for v in p]
    i = 0
    order = sorted(range(len(p)), key=lambda j: -p[j])
    while sum(counts) < num_clips:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > num_clips:
        j = max(range(len(counts)), key=lambda j: counts[j])
        counts[j] -= 1
    return counts


def expression_labels(num_clips: int, expressions: Sequence[str], class_balance, seed: int) -> Tensor:
    """``[num_clips]`` int64 class of every clip (counts from :func:`class_counts`, shuffled)."""
    counts = class_counts(num_clips, expressions, class_balance)
    labels = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
    perm = torch.randperm(num_clips, generator=item_generator(seed, _LABELS, 0))
    return labels[perm]


def assign_folds(labels: Tensor, num_folds: int, seed: int) -> Tensor:
    """Stratified fold id ``[N]`` of every item: each class dealt round-robin over the folds."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    g = item_generator(seed, _LABELS, 1)
    folds = torch.empty_like(labels)
    offset = 0
    for k in labels.unique().tolist():
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        folds[idx] = (torch.arange(len(idx)) + offset) % num_folds
        offset += len(idx)
    return folds


@dataclass
class WildClips:
    """Rendered wild expression clips.

    Attributes:
        frames: ``[N, T, 3, H, W]`` uint8.
        labels: ``[N]`` int64 class index into ``expressions``.
        intensity: ``[N, T, A]`` the AU intensities actually rendered (after composition noise).
        clip_ids: ``[N]`` benchmark clip ids.
        expressions: class names.
    """

    frames: Tensor
    labels: Tensor
    intensity: Tensor
    clip_ids: Tensor
    expressions: tuple[str, ...]


def _u(g, lo, hi, *shape):
    return lo + (hi - lo) * torch.rand(*shape, generator=g) if shape else lo + (hi - lo) * float(torch.rand((), generator=g))


def _wild_clip_params(label: str, T: int, g: torch.Generator, *, drop_p: float, extra_p: float, nuisance: float):
    comp = facs.EXPRESSIONS[label].aus
    A = len(RENDERED_AUS)
    peak = torch.zeros(A)
    kept = [a for a in comp if float(torch.rand((), generator=g)) >= drop_p]
    if comp and not kept:
        kept = [comp[int(torch.randint(0, len(comp), (), generator=g))]]
    for a in kept:
        peak[_COL[a]] = _u(g, 0.5, 1.0)
    if float(torch.rand((), generator=g)) < extra_p:
        others = [a for a in RENDERED_AUS if a not in comp]
        a = others[int(torch.randint(0, len(others), (), generator=g))]
        peak[_COL[a]] = _u(g, 0.15, 0.45)
    # onset at a random frame of the first third, 2-5 frame rise, sometimes a partial offset
    t = torch.arange(T, dtype=torch.float32)
    start = _u(g, -0.15 * T, 0.3 * T)
    rise = max(_u(g, 0.1 * T, 0.3 * T), 0.5)
    env = ((t - start) / rise).clamp(0, 1)
    if float(torch.rand((), generator=g)) < 0.3:
        off = _u(g, 0.7 * T, T)
        env = env * (1.0 - 0.5 * ((t - off) / max(0.2 * T, 0.5)).clamp(0, 1))
    inten = env[:, None] * peak[None]

    s = 0.5 * nuisance
    pose0 = torch.tensor([
        _u(g, -0.20, 0.20) * s, 1.0 + _u(g, -0.15, 0.05) * s, _u(g, -0.08, 0.08) * s, _u(g, -0.08, 0.08) * s,
        _u(g, -0.30, 0.30) * s,
    ])
    drift = torch.tensor([_u(g, -0.08, 0.08), _u(g, -0.03, 0.03), _u(g, -0.03, 0.03), _u(g, -0.03, 0.03), _u(g, -0.15, 0.15)]) * s
    frac = (t / max(T - 1, 1))[:, None]
    pose = pose0[None] + frac * drift[None] + 0.003 * s * torch.randn(T, 5, generator=g)

    K = 3 if nuisance > 0 else 0
    clutter = torch.zeros(K, 8)
    if K:
        clutter[:, 0:2] = _u(g, -1.0, 1.0, K, 2)
        clutter[:, 2:4] = _u(g, 0.08, 0.4, K, 2)
        clutter[:, 4:7] = torch.rand(K, 3, generator=g)
        clutter[:, 7] = (torch.rand(K, generator=g) < 0.5).float()
    occ = torch.zeros(8)
    if float(torch.rand((), generator=g)) < 0.15 * min(nuisance, 1.0):
        occ[0] = 1.0
        occ[1], occ[2] = _u(g, -0.8, 0.8), _u(g, -0.3, 0.9)
        occ[3], occ[4] = _u(g, 0.1, 0.25), _u(g, 0.08, 0.22)
        occ[5] = float(torch.rand((), generator=g))
        occ[6] = float(torch.rand((), generator=g) < 0.5)
    scene = {
        "gain": torch.full((T,), 1.0 + _u(g, -0.35, 0.25) * s),
        "light_dir": (_u(g, -0.3, 0.3, 2) * s).expand(T, 2),
        "cast": (1.0 + _u(g, -0.1, 0.1, 3) * s).expand(T, 3),
        "clutter": clutter.expand(T, K, 8),
        "occluder": occ.expand(T, 8),
        "blur": torch.full((T,), _u(g, 0.0, 0.6) * s),
        "noise": torch.full((T,), _u(g, 0.0, 0.04) * s),
        "noise_seed": torch.randint(0, 10_000, (T,), generator=g).float(),
    }
    background = torch.rand(3, generator=g)
    return inten, pose, scene, background


def generate_wild_clips(
    clip_ids: Sequence[int],
    labels: Sequence[int],
    *,
    expressions: Sequence[str] = facs.EXPRESSIONS_7,
    num_frames: int = 16,
    image_size: int = 32,
    seed: int = 0,
    drop_p: float = 0.1,
    extra_p: float = 0.25,
    nuisance: float = 1.0,
) -> WildClips:
    """Render wild-like expression clips: Table S4 compositions with noise and nuisances.

    Per clip: a random identity; the expression's AUs (``facs.EXPRESSIONS[name].aus``), each
    dropped with probability ``drop_p`` (default 0.1; at least one kept), peak intensity 0.5-1, plus with
    probability ``extra_p`` one unrelated AU at 0.2-0.6; an onset between -15% and 30% of the clip,
    a rise over 10-30% of the clip, in 30% of clips a partial offset (to half) near the end; head pose (roll, scale, translation, yaw)
    with a drift over the clip; background colour and clutter shapes; lighting gain, gradient and
    colour cast; blur; pixel noise; an occluder in 20% of clips. ``nuisance`` scales the pose,
    lighting, blur, noise and clutter ranges (0 = frontal plain scene).
    """
    expressions = tuple(expressions)
    for e in expressions:
        if e not in facs.EXPRESSIONS:
            raise facs.UnknownLabelError(f"unknown expression {e!r}; valid: {sorted(facs.EXPRESSIONS)}")
    if len(clip_ids) != len(labels):
        raise ValueError(f"clip_ids and labels differ in length: {len(clip_ids)} vs {len(labels)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    T = num_frames
    idents, intens, poses, scenes = [], [], [], []
    for c, y in zip(clip_ids, labels):
        if not 0 <= int(y) < len(expressions):
            raise ValueError(f"label {int(y)} out of range for {len(expressions)} expressions")
        g = item_generator(seed, _WILD, int(c))
        ident = sample_identities(1, generator=g)
        inten, pose, scene, bg = _wild_clip_params(
            expressions[int(y)], T, g, drop_p=drop_p, extra_p=extra_p, nuisance=nuisance
        )
        if nuisance > 0:
            ident["background"] = bg[None]
        idents.append(ident)
        intens.append(inten)
        poses.append(pose)
        scenes.append(scene)
    n = len(idents)
    if n == 0:
        empty = torch.zeros(0, T, 3, image_size, image_size, dtype=torch.uint8)
        return WildClips(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, T, len(RENDERED_AUS)),
                         torch.zeros(0, dtype=torch.long), expressions)
    rows = torch.arange(n).repeat_interleave(T)
    ident = {k: torch.cat([d[k] for d in idents])[rows] for k in idents[0]}
    scene = {k: torch.cat([s[k] for s in scenes]) for k in scenes[0]}
    intensity = torch.stack(intens)
    frames = render_faces(
        ident, intensity.reshape(n * T, -1), image_size=image_size, pose=torch.cat(poses), scene=scene
    )
    return WildClips(
        frames=_to_uint8(frames).reshape(n, T, 3, image_size, image_size),
        labels=torch.as_tensor([int(y) for y in labels], dtype=torch.long),
        intensity=intensity,
        clip_ids=torch.as_tensor([int(c) for c in clip_ids], dtype=torch.long),
        expressions=expressions,
    )
