"""In-memory synthetic datasets with the item contract of the real clip datasets, and export.

:class:`SyntheticExpressionDataset` items look like :class:`~facelayers.data.ExpressionClipDataset`
items and :class:`SyntheticAUDataset` items like :class:`~facelayers.data.AUClipDataset` items
(same keys, shapes, dtypes, window rule), so a training loop cannot tell them apart. Frames are
pre-rendered at construction into uint8 tensors; ``export`` writes lossless PNG frame folders and
a manifest in the real DFEW / BP4D / DISFA format that the real loaders read back exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ... import facs
from ..datasets import _plan_run, _realise
from ..manifests import AURecord, ExpressionRecord, get_format, write_manifest
from .domains import (
    assign_folds,
    expression_labels,
    generate_lab_sequences,
    generate_wild_clips,
    item_generator,
)

__all__ = ["SyntheticAUDataset", "SyntheticExpressionDataset"]

_SPLITS = ("train", "val", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def _apply(transform: Callable | None, clip: Tensor, generator: torch.Generator | None) -> Tensor:
    if transform is None:
        return clip
    from ..transforms import ClipTransform

    if isinstance(transform, ClipTransform):
        return transform(clip, generator)
    return transform(clip)


def _item_gen(seed: int | None, epoch: int, index: int) -> torch.Generator | None:
    return None if seed is None else item_generator(seed, 100 + epoch, index)


def _write_png(frame: Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG", compress_level=1)


class SyntheticExpressionDataset(Dataset):
    """Wild-like synthetic expression clips (clip-level labels), pre-rendered in memory.

    The benchmark has ``num_clips`` clips in total (class counts from ``class_balance``), dealt
    into ``num_folds`` stratified folds; ``test`` is fold ``fold``, ``val`` is a stratified
    ``val_fraction`` of the other folds' clips and ``train`` the rest (clip-disjoint). Only the
    requested split is rendered; the same ``seed`` always gives the same clips.

    Item: ``dict(clip=FloatTensor[T, 3, H, W] in [0, 1] (before transform), label=LongTensor[]
    (scalar), index=int)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        expressions: class names in label order (``facs.EXPRESSIONS_7`` or ``facs.EXPRESSIONS_11``).
        num_clips: clips in the whole benchmark (all splits).
        num_frames: ``T``, frames per clip.
        image_size: frame height and width.
        seed: benchmark seed (identities, compositions, scenes, labels, folds).
        transform: applied to the float clip (a ``ClipTransform`` gets a per-item generator).
        num_folds, fold: fold layout (DFEW has 5) and the test fold.
        val_fraction: share of the non-test clips held out as ``val``.
        class_balance: ``"dfew"`` (DFEW-like imbalance, see ``DFEW_CLASS_FREQUENCIES``),
            ``"uniform"`` or one weight per class.
        drop_p, extra_p, nuisance: difficulty (see :func:`generate_wild_clips`).
        item_seed: seeds the per-item transform generators (``None``: global RNG).
    """

    def __init__(
        self,
        *,
        split: Literal["train", "val", "test"] = "train",
        expressions: Sequence[str] = facs.EXPRESSIONS_7,
        num_clips: int = 700,
        num_frames: int = 16,
        image_size: int = 32,
        seed: int = 0,
        transform: Callable[..., Tensor] | None = None,
        num_folds: int = 5,
        fold: int = 0,
        val_fraction: float = 0.1,
        class_balance: str | Sequence[float] = "dfew",
        drop_p: float = 0.1,
        extra_p: float = 0.25,
        nuisance: float = 1.0,
        item_seed: int | None = None,
    ) -> None:
        _check_split(split)
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.expressions = tuple(expressions)
        self.split = split
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.item_seed = item_seed
        self.epoch = 0
        labels = expression_labels(num_clips, self.expressions, class_balance, seed)
        folds = assign_folds(labels, num_folds, seed)
        test = folds == fold
        rest = torch.nonzero(~test).flatten()
        # stratified val carve-out from the training folds
        val = torch.zeros_like(test)
        g = item_generator(seed, 4, fold)
        for k in labels[rest].unique().tolist():
            idx = rest[labels[rest] == k]
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_val = int(round(val_fraction * len(idx)))
            if val_fraction > 0 and len(idx) >= 3:
                n_val = max(1, n_val)  # every class is represented in val
            val[idx[:n_val]] = True
        chosen = {"test": test, "val": val, "train": ~test & ~val}[split]
        ids = torch.nonzero(chosen).flatten()
        clips = generate_wild_clips(
            ids.tolist(),
            labels[ids].tolist(),
            expressions=self.expressions,
            num_frames=num_frames,
            image_size=image_size,
            seed=seed,
            drop_p=drop_p,
            extra_p=extra_p,
            nuisance=nuisance,
        )
        self.frames = clips.frames  # [N, T, 3, H, W] uint8
        self.labels = clips.labels  # [N]
        self.clip_ids = clips.clip_ids  # [N]
        self.intensity = clips.intensity  # [N, T, A]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item transform generators."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        index = index % len(self)
        clip = self.frames[index].float().div_(255.0)
        clip = _apply(self.transform, clip, _item_gen(self.item_seed, self.epoch, index))
        return {"clip": clip, "label": self.labels[index].clone(), "index": index}

    def export(self, root: str | os.PathLike[str], *, format: str = "dfew", manifest: str | None = None) -> Path:
        """Write this split as frame folders + a manifest readable by ``ExpressionClipDataset``.

        Frames go to ``root/<clip id:05d>/<t:05d>.png`` (lossless: a read-back is exact); the
        manifest (``root/<split>.txt`` unless ``manifest`` names another file under ``root``) has
        DFEW lines ``<clip id:05d> <T> <label>``.

        Args:
            root: output folder (created).
            format: ``"dfew"``, ``"ferv39k"`` or ``"mafw"`` (the class count must fit).

        Returns:
            The manifest path.
        """
        fmt = get_format(format)
        if fmt.kind != "expression":
            raise ValueError(f"format must be an expression format (dfew, ferv39k, mafw), got {format!r}")
        if fmt.num_classes is not None and len(self.expressions) > fmt.num_classes:
            raise ValueError(f"{format} has {fmt.num_classes} classes, the dataset has {len(self.expressions)}")
        root = Path(root)
        records = []
        for i in range(len(self)):
            name = f"{int(self.clip_ids[i]):05d}"
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for t in range(self.num_frames):
                _write_png(self.frames[i, t], folder / f"{t + 1:05d}.png")
            records.append(ExpressionRecord(path=name, num_frames=self.num_frames, label=int(self.labels[i])))
        return write_manifest(records, root / (manifest or f"{self.split}.txt"), format)

    def __repr__(self) -> str:
        return (
            f"SyntheticExpressionDataset(split={self.split!r}, clips={len(self)}, classes={len(self.expressions)}, "
            f"num_frames={self.num_frames}, image_size={self.image_size}, seed={self.seed})"
        )


class SyntheticAUDataset(Dataset):
    """Lab-like synthetic AU windows (frame-level labels), pre-rendered in memory.

    ``num_subjects`` identities are dealt into ``num_folds`` subject folds; ``test`` is fold
    ``fold``, ``val`` takes ``val_subjects`` of the remaining subjects, ``train`` the rest
    (subject-independent). Each subject has ``sequences_per_subject`` takes of
    ``sequence_length`` frames. Windows follow exactly the rule of
    :class:`~facelayers.data.AUClipDataset` (:func:`~facelayers.data.au_windows`: centre or
    all-frame labels, ``stride``, ``eval_cover``, edge padding with ``mask`` False); in training
    mode each window is shifted by a uniform ``0 .. stride-1`` frames (one draw per item, the
    same draw as the real loader), never past the take's end: a window never reads another take.

    Item: ``dict(clip=FloatTensor[T, 3, H, W], labels=FloatTensor[M] ("center") or [T, M] ("all"),
    mask=BoolTensor[T], index=int)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        aus: label vocabulary (``facs.BP4D_AUS``, ``facs.DISFA_AUS`` or any rendered AUs).
        num_subjects: subjects in the whole benchmark.
        num_frames: ``T``.
        image_size: frame size.
        label_mode: ``"center"`` or ``"all"``.
        seed: benchmark seed.
        transform: applied to the float clip.
        stride: window step (default ``T``, as the real dataset).
        eval_cover: one window centred on every frame.
        train: random window shifts; default: ``split == "train"``.
        num_folds, fold, val_subjects: subject fold layout.
        sequences_per_subject, sequence_length: takes per subject and their length.
        distractors: non-vocabulary AUs also appear (unlabelled).
        item_seed: seeds per-item generators (window shifts, transforms); ``None``: global RNG.
    """

    def __init__(
        self,
        *,
        split: Literal["train", "val", "test"] = "train",
        aus: Sequence[int] = facs.BP4D_AUS,
        num_subjects: int = 18,
        num_frames: int = 16,
        image_size: int = 32,
        label_mode: Literal["center", "all"] = "center",
        seed: int = 0,
        transform: Callable[..., Tensor] | None = None,
        stride: int | None = None,
        eval_cover: bool = False,
        train: bool | None = None,
        num_folds: int = 3,
        fold: int = 0,
        val_subjects: int | None = None,
        sequences_per_subject: int = 2,
        sequence_length: int = 64,
        distractors: bool = True,
        item_seed: int | None = None,
    ) -> None:
        _check_split(split)
        if label_mode not in ("center", "all"):
            raise ValueError(f"label_mode must be 'center' or 'all', got {label_mode!r}")
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
        if num_subjects < num_folds + 1:
            raise ValueError(f"num_subjects must be >= num_folds + 1 = {num_folds + 1}, got {num_subjects}")
        stride = num_frames if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.aus = tuple(int(a) for a in aus)
        self.split = split
        self.num_frames = num_frames
        self.image_size = image_size
        self.label_mode = label_mode
        self.seed = seed
        self.transform = transform
        self.stride = stride
        self.eval_cover = eval_cover
        self.train = (split == "train") if train is None else bool(train)
        self.item_seed = item_seed
        self.epoch = 0
        perm = torch.randperm(num_subjects, generator=item_generator(seed, 5, 0))
        subject_fold = torch.empty(num_subjects, dtype=torch.long)
        subject_fold[perm] = torch.arange(num_subjects) % num_folds
        test = torch.nonzero(subject_fold == fold).flatten().tolist()
        rest = [int(s) for s in perm.tolist() if int(subject_fold[s]) != fold]
        n_val = max(1, round(0.15 * len(rest))) if val_subjects is None else int(val_subjects)
        if not 0 <= n_val < len(rest):
            raise ValueError(f"val_subjects must be in [0, {len(rest) - 1}], got {n_val}")
        subjects = {"test": sorted(test), "val": sorted(rest[:n_val]), "train": sorted(rest[n_val:])}[split]
        self.subjects = subjects
        data = generate_lab_sequences(
            subjects,
            aus=self.aus,
            sequences_per_subject=sequences_per_subject,
            sequence_length=sequence_length,
            image_size=image_size,
            seed=seed,
            distractors=distractors,
        )
        self.data = data
        self.frames = data.frames  # [F, 3, H, W] uint8
        self.frame_labels = data.labels  # [F, M]
        # Windows are planned per take exactly as AUClipDataset plans them per run: (take, anchor,
        # max shift). The shift moves the anchor and the window is realised afterwards (slots
        # clamped to the take, mask recomputed), so a window never reads past a take's end or
        # into the next take, whatever the shift.
        self._starts = list(data.starts)
        self._lengths = list(data.lengths)
        self._windows: list[tuple[int, int, int]] = []
        for take, length in enumerate(self._lengths):  # a take is one continuous run
            for anchor, jitter in _plan_run(length, num_frames, label_mode, stride, eval_cover):
                self._windows.append((take, anchor, 0 if eval_cover else jitter))

    def __len__(self) -> int:
        return len(self._windows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item generators (only matters with ``item_seed``)."""
        self.epoch = int(epoch)

    def window_take(self, index: int) -> int:
        """Take (index into ``data.starts`` / ``data.lengths``) that window ``index`` reads."""
        return self._windows[index][0]

    def window_rows(self, index: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Rows of :attr:`frames` read by window ``index`` ``[T]`` and its mask ``[T]``.

        In training mode the shift is drawn from ``generator`` (the same single draw
        :meth:`AUClipDataset.window_frames <facelayers.data.AUClipDataset.window_frames>` makes);
        every row lies inside the window's take (:meth:`window_take`).
        """
        take, anchor, jitter = self._windows[index]
        if self.train and jitter > 0:
            anchor += int(torch.randint(0, jitter + 1, (), generator=generator))
        pos, mask = _realise(range(self._lengths[take]), anchor, self.num_frames)
        rows = torch.tensor(pos, dtype=torch.long) + self._starts[take]
        return rows, torch.tensor(mask, dtype=torch.bool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        index = index % len(self)
        g = _item_gen(self.item_seed, self.epoch, index)
        rows, mask = self.window_rows(index, g)
        clip = _apply(self.transform, self.frames[rows].float().div_(255.0), g)
        if self.label_mode == "center":
            labels = self.frame_labels[rows[self.num_frames // 2]].clone()
        else:
            labels = self.frame_labels[rows].clone()
        return {"clip": clip, "labels": labels, "mask": mask.clone(), "index": index}

    def export(self, root: str | os.PathLike[str], *, format: str = "bp4d", manifest: str | None = None) -> Path:
        """Write this split's frames + a manifest readable by ``AUClipDataset``.

        ``"bp4d"``: ``root/1F<subject:02d>_<take:02d>/<frame>.png`` (BP4D's ``<prefix><F|M><NN>_<task>``
        sequence convention, so ``AURecord.subject`` groups takes by subject) (unpadded frame numbers from 1), lines
        ``path b1 .. b12`` for the BP4D vocabulary. ``"disfa"``: one folder per subject,
        ``root/RightVideoSN<subject:03d>/frame_<n>.png``, takes one after another with one missing
        frame number between them (so windows never join two takes), JSON lines with the DISFA
        vocabulary. Labels are recomputed from the rendered intensities for the format's
        vocabulary (any dataset ``aus`` can export either format). PNG frames are lossless.

        Returns:
            The manifest path (``root/<split>.list`` or ``.jsonl`` unless ``manifest`` is given).
        """
        fmt = get_format(format)
        if fmt.kind != "au":
            raise ValueError(f"format must be 'bp4d' or 'disfa', got {format!r}")
        assert fmt.aus is not None
        labels = self.data.labels_for(fmt.aus).to(torch.int64)
        root = Path(root)
        records = []
        next_index: dict[int, int] = {}
        for start, length, subj, take in zip(self._starts, self._lengths, self.data.subjects, self.data.takes):
            if fmt.name == "bp4d":
                if subj > 99 or take + 1 > 99:
                    raise ValueError(
                        "BP4D export names sequences <prefix><F|M><NN>_<NN> (expected subject ids 0..99 and at most "
                        f"99 takes, got subject {subj} take {take + 1})"
                    )
                seq = f"1F{subj:02d}_{take + 1:02d}"
                first = 1
                names = [f"{first + i}.png" for i in range(length)]
            else:
                seq = f"RightVideoSN{subj:03d}"
                first = next_index.get(subj, 0)
                next_index[subj] = first + length + 1  # leave a gap between takes
                names = [f"frame_{first + i}.png" for i in range(length)]
            folder = root / seq
            folder.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                _write_png(self.frames[start + i], folder / name)
                records.append(
                    AURecord(
                        path=f"{seq}/{name}",
                        sequence=seq,
                        frame_index=first + i,
                        labels=tuple(int(v) for v in labels[start + i].tolist()),
                    )
                )
        ext = "list" if fmt.name == "bp4d" else "jsonl"
        return write_manifest(records, root / (manifest or f"{self.split}.{ext}"), format)

    def __repr__(self) -> str:
        return (
            f"SyntheticAUDataset(split={self.split!r}, windows={len(self)}, subjects={len(self.subjects)}, "
            f"aus={list(self.aus)}, num_frames={self.num_frames}, label_mode={self.label_mode!r}, "
            f"stride={self.stride}, train={self.train})"
        )
