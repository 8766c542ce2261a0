"""Data of the reference SSM recipe: the synthetic FACS benchmark (default) or the public manifests
(BP4D / DISFA + DFEW / FERV39K / MAFW), split into train / validation / test per task.

The validation split is carved from the training data: whole AU *subjects* (``AURecord.subject``,
parsed by each dataset's convention, so it is subject-independent like the test folds) and random
expression clips.

Data choices (each an argument of :func:`build_datasets`; the released code's are what
``--recipe ssm_release`` selects, see ``docs/release.md`` ("Training recipe")):

* ``au_train_windows``: ``"padded"`` (default: windows every ``stride`` frames over every frame,
  short runs and the last window of a run edge-padded; real data: randomly shifted in training)
  or ``"full"`` (the release's training windows: whole ``T``-frame windows at ``0, T, 2T, ...``
  of every run, short runs and run tails dropped, :func:`facelayers.data.datasets.full_windows`).
  Evaluation windows cover every labelled frame either way.
* ``exp_sampling``: ``"segments"`` (default, :func:`facelayers.data.segment_indices`) or
  ``"release"`` (:func:`facelayers.data.datasets.release_segment_indices`). Real data only: the
  synthetic clips are rendered with exactly ``T`` frames.
* ``erase_p``: random-erasing probability of the real-data training transform (default 0.3, the
  release 0); the synthetic training transform (flip + normalisation) never erases.

Every transform normalises with the full-precision OpenAI CLIP mean / std
(:data:`facelayers.data.CLIP_MEAN`, :data:`facelayers.data.CLIP_STD`), as the release does for
every dataset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from facelayers import facs

__all__ = [
    "AU_TRAIN_WINDOWS",
    "EXP_SAMPLING",
    "DataUnavailableError",
    "FullWindowSubset",
    "au_frame_table",
    "labelled_frame_count",
    "window_frame_keys",
    "DataBundle",
    "build_datasets",
    "build_real_datasets",
    "build_synthetic_datasets",
    "split_indices",
    "split_by_subject",
    "validation_record",
    "check_expression_vocabulary",
    "check_media_present",
    "SYNTHETIC_DEFAULT",
    "SYNTHETIC_QUICK",
    "apply_transfer_settings",
    "expression_labels_of",
    "unseen_class_ids",
]


class DataUnavailableError(RuntimeError):
    """Real-data options are incomplete or point to missing files."""


#: Choices of ``au_train_windows`` (see the module docstring).
AU_TRAIN_WINDOWS: tuple[str, ...] = ("padded", "full")


def _exp_samplers() -> dict[str, Any]:
    from facelayers.data.datasets import release_segment_indices, segment_indices

    return {"segments": segment_indices, "release": release_segment_indices}


#: Choices of ``exp_sampling`` (see the module docstring).
EXP_SAMPLING: tuple[str, ...] = ("segments", "release")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)} (expected one of them, got {value!r})")


def _all_windows(dataset: Any) -> Any:
    return dataset


class FullWindowSubset(torch.utils.data.Subset):
    """The windows of a :class:`~facelayers.data.synthetic.SyntheticAUDataset` whose ``T`` slots
    are all real frames (``mask`` all True): with ``stride = T`` and no shift, exactly the windows
    :func:`facelayers.data.datasets.full_windows` plans (starts ``0, T, 2T, ...`` of each take;
    takes shorter than ``T`` and take tails dropped), i.e. the released code's AU training windows.

    Items are the dataset's (their ``index`` is the dataset's window index); :meth:`set_epoch` is
    forwarded.

    Raises:
        ValueError: the dataset shifts its windows (``train=True``) or no window is full.
    """

    def __init__(self, dataset: Any) -> None:
        if getattr(dataset, "train", False):
            raise ValueError("FullWindowSubset needs fixed windows (expected a dataset with train=False, got train=True)")
        keep = [i for i in range(len(dataset)) if bool(dataset.window_rows(i)[1].all())]
        if not keep:
            raise ValueError(f"no full window in {dataset!r} (expected at least one take of >= {dataset.num_frames} "
                             "frames, got none)")
        super().__init__(dataset, keep)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the dataset."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __repr__(self) -> str:
        return f"FullWindowSubset(windows={len(self)} of {len(self.dataset)}, dataset={self.dataset!r})"


@dataclass
class DataBundle:
    """Train / val / test datasets per task plus the label vocabularies.

    Items follow the facelayers data contract: expression ``dict(clip [T,3,H,W], label, index)``,
    AU ``dict(clip [T,3,H,W], labels [M] or [T,M], mask Bool[T], index)``.
    """

    expressions: tuple[str, ...]
    aus: tuple[int, ...]
    train: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    au_test_positive_rate: list[float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index split with ``round(fraction * n)`` validation items (>= 1).

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or fewer than 2 items.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) (expected 0 < fraction < 1, got {fraction})")
    if n < 2:
        raise ValueError(f"need at least 2 training items to carve a validation split (expected >= 2, got {n})")
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def _subject(record: Any) -> str:
    """The record's subject id (``AURecord.subject``, parsed by :func:`facelayers.data.read_manifest`
    with the dataset's convention)."""
    subject = getattr(record, "subject", None)
    if not subject:
        raise ValueError(f"AU record {getattr(record, 'path', record)!r} has no subject (expected AURecord.subject, "
                         "as read_manifest fills it, got None)")
    return subject


def validation_record(requested: float, held_out: int, total: int, unit: str) -> dict[str, Any]:
    """What a validation fraction became: ``held_out`` of ``total`` ``unit`` (at least one on each
    side, so a small set cannot follow the fraction); ``note`` is a sentence when the effective
    fraction is off by more than half of the requested one (``None`` otherwise)."""
    effective = held_out / total
    off = not 0.5 * requested <= effective <= 1.5 * requested
    note = (f"--val-fraction {requested:g} holds out {held_out} of {total} {unit} ({effective:.0%}): a validation "
            f"split keeps at least one on each side" if off else None)
    return {"requested": requested, "held_out": held_out, "total": total, "unit": unit, "effective": effective,
            "note": note}


def split_by_subject(records: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val) AU records with whole subjects in validation (no subject on both sides).

    ``round(fraction * S)`` of the ``S`` subjects (at least one, at most ``S - 1``) go to
    validation, drawn with :func:`split_indices` over the sorted subject ids.

    Raises:
        ValueError: fewer than 2 subjects, or ``fraction`` outside ``(0, 1)``.
    """
    subjects = sorted({_subject(r) for r in records})
    if len(subjects) < 2:
        raise ValueError(f"a subject-independent validation split needs at least 2 subjects "
                         f"(expected >= 2, got {len(subjects)}: {subjects})")
    _, va_i = split_indices(len(subjects), fraction, seed)
    val_subjects = {subjects[i] for i in va_i}
    return ([r for r in records if _subject(r) not in val_subjects],
            [r for r in records if _subject(r) in val_subjects])


#: Fewest clips of a MAFW manifest for which using none of MAFW's four extra classes means "not MAFW".
MAFW_DETECT_MIN_CLIPS = 50


def check_expression_vocabulary(records: Sequence[Any], dataset: str, path: str | os.PathLike) -> None:
    """Refuse a 7-class (DFEW / FERV39K) manifest given as MAFW, where detectable: a MAFW manifest of
    at least :data:`MAFW_DETECT_MIN_CLIPS` clips whose labels never leave the first 7 classes.

    Raises:
        DataUnavailableError: naming the file, what was expected and what the labels look like.
    """
    if dataset != "mafw" or len(records) < MAFW_DETECT_MIN_CLIPS:
        return
    top = max(int(r.label) for r in records)
    if top < len(facs.EXPRESSIONS_7):
        raise DataUnavailableError(
            f"{os.fspath(path)}: labels use only classes 0..{top} over {len(records)} clips (expected a MAFW "
            f"manifest with its 11 classes, got what looks like a 7-class DFEW / FERV39K manifest; pass "
            f"--exp-dataset dfew or ferv39k)")


def check_media_present(records: Sequence[Any], root: str | os.PathLike, manifest: str | os.PathLike) -> None:
    """Every clip folder / video (expression records) or sequence folder (AU records) a manifest
    names exists under ``root`` (frames inside are checked when read).

    Raises:
        DataUnavailableError: naming the manifest, the root, how many are missing and a few of them.
    """
    root = os.fspath(root)
    wanted = sorted({getattr(r, "sequence", None) or r.path for r in records})
    missing = [w for w in wanted if not os.path.exists(os.path.join(root, w))]
    if missing:
        raise DataUnavailableError(
            f"{os.fspath(manifest)}: {len(missing)} of {len(wanted)} folders missing under {root} (expected every "
            f"listed folder to exist, got none for {missing[:3]}{' ...' if len(missing) > 3 else ''})")


def build_real_datasets(
    *, frames: int, image_size: int, seed: int, val_fraction: float, au_dataset: str, au_root: str | None,
    au_manifest: str | None, au_test_manifest: str | None, exp_dataset: str, exp_root: str | None,
    exp_manifest: str | None, exp_test_manifest: str | None, au_select: str = "center",
    tasks: Sequence[str] = ("exp", "au"), au_train_windows: str = "padded", exp_sampling: str = "segments",
    erase_p: float | None = None,
) -> DataBundle:
    """Datasets from the public manifests (BP4D / DISFA and DFEW / FERV39K / MAFW).

    The validation split is carved from the training manifest: whole AU subjects (so it is
    subject-independent, like the test folds) and random expression clips. ``au_train_windows``,
    ``exp_sampling``, ``erase_p``: see the module docstring (``erase_p=None``: the training
    preset's 0.3).
    """
    from facelayers.data import AUClipDataset, ExpressionClipDataset, eval_transform, read_manifest, train_transform
    from facelayers.data.datasets import full_windows

    _check_choice("au_train_windows", au_train_windows, AU_TRAIN_WINDOWS)
    _check_choice("exp_sampling", exp_sampling, EXP_SAMPLING)
    sampler = _exp_samplers()[exp_sampling]
    planner = {"padded": None, "full": full_windows}[au_train_windows]

    need = []
    if "au" in tasks:
        need += [("--au-root", au_root), ("--au-manifest", au_manifest), ("--au-test-manifest", au_test_manifest)]
    if "exp" in tasks:
        need += [("--exp-root", exp_root), ("--exp-manifest", exp_manifest), ("--exp-test-manifest", exp_test_manifest)]
    missing = [n for n, v in need if not v]
    if missing:
        raise DataUnavailableError(f"--data real needs {', '.join(missing)} (see docs/reference.md)")
    for n, v in need:
        if n.endswith("manifest") and not os.path.isfile(v):
            raise DataUnavailableError(f"{n}: file not found: {v}")
        if n.endswith("root") and not os.path.isdir(v):
            raise DataUnavailableError(f"{n}: folder not found: {v}")
    aus = facs.BP4D_AUS if au_dataset == "bp4d" else facs.DISFA_AUS
    expressions = facs.MAFW_EXPRESSIONS if exp_dataset == "mafw" else facs.EXPRESSIONS_7
    tr_tf = train_transform(image_size) if erase_p is None else train_transform(image_size, erase_p=erase_p)
    ev_tf = eval_transform(image_size)
    train, val, test = {}, {}, {}
    rate = None
    held_out: dict[str, dict[str, Any]] = {}  # what --val-fraction became (whole subjects / clips)
    if "au" in tasks:
        recs = read_manifest(au_manifest, au_dataset)
        te_recs = read_manifest(au_test_manifest, au_dataset)
        check_media_present(recs, au_root, au_manifest)
        check_media_present(te_recs, au_root, au_test_manifest)
        try:
            tr_recs, va_recs = split_by_subject(recs, val_fraction, seed)
        except ValueError as err:
            raise DataUnavailableError(f"{os.fspath(au_manifest)}: {err}") from None
        n_subjects = len({_subject(r) for r in recs})
        held_out["au"] = validation_record(val_fraction, len({_subject(r) for r in va_recs}), n_subjects, "subjects")
        kw = dict(num_frames=frames, label_mode=au_select)
        train["au"] = AUClipDataset(tr_recs, au_root, train=True, transform=tr_tf, seed=seed, planner=planner, **kw)
        val["au"] = AUClipDataset(va_recs, au_root, eval_cover=au_select == "center", transform=ev_tf, **kw)
        test["au"] = AUClipDataset(te_recs, au_root, eval_cover=au_select == "center", transform=ev_tf, **kw)
        lab = torch.tensor([r.labels for r in te_recs], dtype=torch.float64)
        rate = lab.mean(0).tolist()
    if "exp" in tasks:
        recs = read_manifest(exp_manifest, exp_dataset)
        te_recs = read_manifest(exp_test_manifest, exp_dataset)
        check_expression_vocabulary(recs, exp_dataset, exp_manifest)
        check_media_present(recs, exp_root, exp_manifest)
        check_media_present(te_recs, exp_root, exp_test_manifest)
        try:
            tr_i, va_i = split_indices(len(recs), val_fraction, seed)
        except ValueError as err:
            raise DataUnavailableError(f"{os.fspath(exp_manifest)}: {err}") from None
        held_out["exp"] = validation_record(val_fraction, len(va_i), len(recs), "clips")
        train["exp"] = ExpressionClipDataset([recs[i] for i in tr_i], exp_root, num_frames=frames, train=True,
                                             transform=tr_tf, seed=seed, sampler=sampler)
        val["exp"] = ExpressionClipDataset([recs[i] for i in va_i], exp_root, num_frames=frames, transform=ev_tf,
                                           sampler=sampler)
        test["exp"] = ExpressionClipDataset(te_recs, exp_root, num_frames=frames, transform=ev_tf, sampler=sampler)
    return DataBundle(tuple(expressions), tuple(aus), train, val, test, rate, notes={"validation": held_out})


def build_datasets(*, data: str, frames: int, image_size: int, seed: int, fold: int, quick: bool, size: float,
                   data_seed: int = 0, class_balance: str = "uniform", nuisance: float | None = None,
                   val_fraction: float, exp_fraction: float, au_fraction: float, au_dataset: str,
                   au_root: str | None, au_manifest: str | None, au_test_manifest: str | None, exp_dataset: str,
                   exp_root: str | None, exp_manifest: str | None, exp_test_manifest: str | None,
                   au_select: str = "center", tasks: Sequence[str] = ("exp", "au"),
                   au_train_windows: str = "padded", exp_sampling: str = "segments",
                   erase_p: float | None = None) -> DataBundle:
    """Synthetic benchmark (default) or real datasets; see :func:`build_real_datasets`."""
    if data == "real":
        return build_real_datasets(
            frames=frames, image_size=image_size, seed=seed, val_fraction=val_fraction, au_dataset=au_dataset,
            au_root=au_root, au_manifest=au_manifest, au_test_manifest=au_test_manifest, exp_dataset=exp_dataset,
            exp_root=exp_root, exp_manifest=exp_manifest, exp_test_manifest=exp_test_manifest, au_select=au_select,
            tasks=tasks, au_train_windows=au_train_windows, exp_sampling=exp_sampling, erase_p=erase_p,
        )
    return build_synthetic_datasets(frames=frames, image_size=image_size, seed=data_seed, fold=fold, quick=quick,
                                    size=size, val_fraction=val_fraction, au_dataset=au_dataset,
                                    exp_dataset=exp_dataset, au_select=au_select, tasks=tasks,
                                    class_balance=class_balance, nuisance=nuisance,
                                    au_train_windows=au_train_windows, exp_sampling=exp_sampling)


#: Size of the default synthetic benchmark (``--synthetic-size`` scales the counts).
SYNTHETIC_DEFAULT = dict(exp_clips=2000, au_subjects=40, au_sequences=2, au_sequence_length=48)
SYNTHETIC_QUICK = dict(exp_clips=80, au_subjects=5, au_sequences=1, au_sequence_length=24)


def build_synthetic_datasets(*, frames: int, image_size: int, seed: int, fold: int, quick: bool, size: float,
                             val_fraction: float, au_dataset: str = "bp4d", exp_dataset: str = "dfew",
                             au_select: str = "center", tasks: Sequence[str] = ("exp", "au"),
                             class_balance: str = "uniform", nuisance: float | None = None,
                             au_train_windows: str = "padded", exp_sampling: str = "segments") -> DataBundle:
    """The synthetic FACS benchmark of :mod:`facelayers.data.synthetic` (in memory, no files).

    Expression side: wild-like clips of the 7 (DFEW / FERV39K-like) or 11 (MAFW-like) classes, 5
    stratified folds, test = fold ``fold``; validation = ``val_fraction`` of the other folds.
    AU side: lab-like takes of BP4D-like (12) or DISFA-like (8) AUs, 3 subject folds, test = fold
    ``fold``, validation = 15 % of the other subjects (subject-independent). ``seed`` is the
    *benchmark* seed (the same benchmark for every training seed unless it changes).

    ``au_train_windows="full"``: the AU training windows are the release's (:class:`FullWindowSubset`
    of fixed windows every ``T`` frames) instead of fixed windows every ``T // 2`` frames.
    ``exp_sampling`` is checked and recorded but has no effect here (clips have exactly ``T`` frames).
    """
    _check_choice("au_train_windows", au_train_windows, AU_TRAIN_WINDOWS)
    _check_choice("exp_sampling", exp_sampling, EXP_SAMPLING)
    from facelayers.data import ClipCompose, ClipNormalize, ClipRandomHorizontalFlip
    from facelayers.data.synthetic import SyntheticAUDataset, SyntheticExpressionDataset

    p = dict(SYNTHETIC_QUICK if quick else SYNTHETIC_DEFAULT)
    if size != 1.0:
        p = {k: max(1, int(round(v * size))) if k in ("exp_clips", "au_subjects") else v for k, v in p.items()}
    aus = facs.BP4D_AUS if au_dataset == "bp4d" else facs.DISFA_AUS
    expressions = facs.EXPRESSIONS_11 if exp_dataset == "mafw" else facs.EXPRESSIONS_7
    train_tf = ClipCompose([ClipRandomHorizontalFlip(), ClipNormalize()])
    eval_tf = ClipNormalize()
    train, val, test = {}, {}, {}
    rate = None
    if "exp" in tasks:
        n_folds = 5
        if not 1 <= fold <= n_folds:
            raise ValueError(f"--fold must be in 1..{n_folds} for the synthetic expression benchmark, got {fold}")
        kw = dict(expressions=expressions, num_clips=max(p["exp_clips"], 5 * len(expressions)), num_frames=frames,
                  image_size=image_size, seed=seed, num_folds=n_folds, fold=fold - 1, val_fraction=val_fraction,
                  class_balance=class_balance)
        if nuisance is not None:
            kw["nuisance"] = float(nuisance)
        train["exp"] = SyntheticExpressionDataset(split="train", transform=train_tf, item_seed=seed, **kw)
        val["exp"] = SyntheticExpressionDataset(split="val", transform=eval_tf, **kw)
        test["exp"] = SyntheticExpressionDataset(split="test", transform=eval_tf, **kw)
    if "au" in tasks:
        n_folds = 3
        if not 1 <= fold <= n_folds:
            raise ValueError(f"--fold must be in 1..{n_folds} for the synthetic AU benchmark, got {fold}")
        kw = dict(aus=aus, num_subjects=max(p["au_subjects"], n_folds + 2), num_frames=frames, image_size=image_size,
                  label_mode=au_select, seed=seed, num_folds=n_folds, fold=fold - 1,
                  sequences_per_subject=p["au_sequences"], sequence_length=p["au_sequence_length"])
        stride = max(1, frames // 2)
        # fixed windows every T/2 frames (train=False: SyntheticAUDataset's random window shift can
        # step past the end of a take at the time of writing, see the report of issue 8)
        train_stride, select = {"padded": (stride, _all_windows), "full": (frames, FullWindowSubset)}[au_train_windows]
        train["au"] = select(SyntheticAUDataset(split="train", transform=train_tf, stride=train_stride, train=False,
                                                item_seed=seed, **kw))
        val["au"] = SyntheticAUDataset(split="val", transform=eval_tf, stride=stride, **kw)
        test["au"] = SyntheticAUDataset(split="test", transform=eval_tf, eval_cover=au_select == "center", **kw)
        rate = test["au"].frame_labels.float().mean(0).tolist()
    notes = {"synthetic": {**p, "class_balance": class_balance, "benchmark_seed": seed, "nuisance": nuisance}}
    return DataBundle(tuple(expressions), tuple(aus), train, val, test, rate, notes)


# ----------------------------------------------------------------------------------------------
# transfer settings (issue 20): few-shot expressions and unseen expression classes


def expression_labels_of(dataset: Any) -> list[int]:
    """Class ids of an expression dataset's items, in item order, without reading any clip: a
    synthetic dataset's ``labels``, an :class:`~facelayers.data.ExpressionClipDataset`'s
    ``records[i].label``, through any ``Subset``.

    Raises:
        TypeError: a dataset with neither.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        inner = expression_labels_of(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    if torch.is_tensor(getattr(dataset, "labels", None)):
        return [int(v) for v in dataset.labels.tolist()]
    if hasattr(dataset, "records"):
        return [int(r.label) for r in dataset.records]
    raise TypeError(f"expected an expression dataset with labels or records, got {type(dataset).__name__}")


def unseen_class_ids(expressions: Sequence[str], unseen: Sequence[str]) -> list[int]:
    """Label ids of the ``unseen`` class names in the vocabulary ``expressions``.

    Raises:
        ValueError: an empty list, a repeated or unknown name (naming the vocabulary), or every
            class unseen (expected at least one class left to train on).
    """
    names = [str(u).strip() for u in unseen]
    if not names or any(not n for n in names):
        raise ValueError(f"unseen classes: expected one or more class names, got {list(unseen)!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"unseen classes: each name once (expected distinct names, got {dup} more than once)")
    unknown = [n for n in names if n not in expressions]
    if unknown:
        hint = ("; the 11-class MAFW vocabulary has them: --exp-dataset mafw"
                if all(n in facs.EXPRESSIONS_11 for n in unknown) else "")
        raise ValueError(f"unseen classes: not in the vocabulary (expected names from {list(expressions)}, got "
                         f"{unknown}{hint})")
    if len(names) >= len(expressions):
        raise ValueError(f"unseen classes: every class would be unseen (expected at most {len(expressions) - 1} of "
                         f"{len(expressions)}, got {len(names)})")
    return sorted(expressions.index(n) for n in names)


def apply_transfer_settings(bundle: DataBundle, *, exp_shots: int | None = None,
                            unseen_classes: Sequence[str] = (), seed: int = 0) -> DataBundle:
    """A copy of ``bundle`` whose expression training data follows the transfer settings.

    * ``unseen_classes``: their clips are dropped from the expression *training* and *validation*
      splits (validation is carved from training data); the test split keeps every class, so
      they are known at test time only through their text descriptions (TSP) and the FACS
      prior (DPM).
    * ``exp_shots=k``: ``k`` training clips of each (seen) class
      (:func:`facelayers.data.loader.few_shot_indices` with ``seed``); validation and test are
      unchanged.

    The AU side is never changed. ``notes["transfer"]`` records the settings and the per-class
    training counts. With neither setting the bundle itself is returned.

    Raises:
        ValueError: no expression task in the bundle, bad names (see :func:`unseen_class_ids`),
            ``exp_shots < 1``, or a class with fewer than ``exp_shots`` training clips.
    """
    from facelayers.data.loader import few_shot_indices, without_classes_indices

    if exp_shots is None and not unseen_classes:
        return bundle
    if "exp" not in bundle.train:
        raise ValueError("transfer settings change the expression data (expected an expression task, got "
                         f"tasks {sorted(bundle.train)})")
    if exp_shots is not None and (isinstance(exp_shots, bool) or not isinstance(exp_shots, int) or exp_shots < 1):
        raise ValueError(f"exp_shots must be an int >= 1 (expected clips per class >= 1, got {exp_shots!r})")
    unseen = unseen_class_ids(bundle.expressions, unseen_classes) if unseen_classes else []
    train, val = dict(bundle.train), dict(bundle.val)
    labels = expression_labels_of(train["exp"])
    seen = [c for c in range(len(bundle.expressions)) if c not in unseen]
    keep = without_classes_indices(labels, unseen)
    if exp_shots is not None:
        try:
            keep = few_shot_indices(labels, exp_shots, seed, classes=seen)
        except ValueError as err:
            counts = {bundle.expressions[c]: labels.count(c) for c in seen}
            raise ValueError(f"--exp-shots {exp_shots}: a class has fewer training clips (expected >= {exp_shots} "
                             f"per class, got {counts})") from err
    if len(keep) != len(labels):
        train["exp"] = torch.utils.data.Subset(train["exp"], keep)
    if unseen and bundle.val.get("exp") is not None:
        val_labels = expression_labels_of(val["exp"])
        val["exp"] = torch.utils.data.Subset(val["exp"], without_classes_indices(val_labels, unseen))
    kept = [labels[i] for i in keep]
    notes = dict(bundle.notes)
    notes["transfer"] = {
        "exp_shots": exp_shots, "unseen_classes": [bundle.expressions[c] for c in unseen], "seed": seed,
        "train_counts": {bundle.expressions[c]: kept.count(c) for c in range(len(bundle.expressions))},
    }
    return DataBundle(bundle.expressions, bundle.aus, train, val, dict(bundle.test), bundle.au_test_positive_rate,
                      notes)


# ----------------------------------------------------------------------------------------------
# every evaluated AU frame in temporal order (for the release's tuned, segment-safe AU F1)


def _base_dataset(dataset: Any) -> Any:
    while isinstance(dataset, torch.utils.data.Subset):  # items keep the base dataset's index
        dataset = dataset.dataset
    return dataset


def _synthetic_keys(dataset: Any, index: int) -> list[tuple[str, int]]:
    rows, _ = dataset.window_rows(index)
    return [(f"take{dataset.window_take(index)}", int(r)) for r in rows.tolist()]


def _record_keys(dataset: Any, index: int) -> list[tuple[str, int]]:
    recs, _ = dataset.window_frames(index)
    return [(r.sequence, int(r.frame_index)) for r in recs]


def window_frame_keys(dataset: Any, index: int) -> list[tuple[str, int]]:
    """``(sequence, frame number)`` read by each of the ``T`` slots of window ``index`` (evaluation
    windows: no shift): a :class:`~facelayers.data.synthetic.SyntheticAUDataset`'s take
    (``"take<k>"``) and frame row (``window_take`` / ``window_rows``), or an
    :class:`~facelayers.data.AUClipDataset`'s record ``sequence`` and ``frame_index``
    (``window_frames``).

    Raises:
        TypeError: a dataset with neither interface.
    """
    if getattr(dataset, "train", False):
        raise ValueError("window_frame_keys: expected an evaluation dataset (train=False, fixed windows), got train=True")
    for needs, keys in ((("window_take", "window_rows"), _synthetic_keys), (("window_frames",), _record_keys)):
        if all(hasattr(dataset, n) for n in needs):
            return keys(dataset, index)
    raise TypeError(f"window_frame_keys: expected an AUClipDataset or a SyntheticAUDataset, got {type(dataset).__name__}")


def labelled_frame_count(dataset: Any) -> int:
    """Number of labelled frames of an AU dataset (what an evaluation covering every frame sees)."""
    base = _base_dataset(dataset)
    if hasattr(base, "records"):
        return len(base.records)
    return int(base.frame_labels.shape[0])


def au_frame_table(dataset: Any, indices: Tensor, probs: Tensor, labels: Tensor,
                   keep: Tensor | None = None) -> dict[str, Any]:
    """Per-window AU outputs -> one row per labelled frame, in temporal order, with its segment.

    Every real slot (all-frame outputs ``[B, T, M]`` with ``keep`` the window mask ``[B, T]``) or
    the centre slot (per-window outputs ``[B, M]``, ``keep`` ``[B]``) of each evaluated window is
    located by :func:`window_frame_keys`; rows are sorted by (sequence, frame number) and a
    *segment* is a run of consecutive frame numbers of one sequence (the released evaluation's
    segments: a vote never crosses a missing frame or a sequence boundary).

    Args:
        dataset: The evaluated AU dataset (a ``Subset`` of it is unwrapped; ``indices`` are the
            items' ``index`` values, i.e. the base dataset's window indices).
        indices: ``[B]`` window indices.
        probs: ``[B, T, M]`` or ``[B, M]`` probabilities.
        labels: same shape as ``probs``.
        keep: ``[B, T]`` / ``[B]`` bool, True where the slot / window counts (``None``: all).

    Returns:
        ``dict(probs=[N, M] float64, target=[N, M] int64, segment_ids=[N] int64,
        keys=[(sequence, frame), ...])`` for the ``N`` distinct frames.

    Raises:
        ValueError: shapes that disagree, or a frame that two windows both evaluate (expected every
            frame once).
    """
    base = _base_dataset(dataset)
    idx = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
    if probs.shape != labels.shape or probs.dim() not in (2, 3) or probs.shape[0] != len(idx):
        raise ValueError(f"au_frame_table: expected probs and labels [B, T, M] or [B, M] with B = {len(idx)}, got "
                         f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    per_frame = probs.dim() == 3
    if keep is None:
        keep = torch.ones(probs.shape[:2] if per_frame else probs.shape[:1], dtype=torch.bool)
    if tuple(keep.shape) != tuple(probs.shape[: 2 if per_frame else 1]):
        raise ValueError(f"au_frame_table: keep must be {tuple(probs.shape[: 2 if per_frame else 1])}, got "
                         f"{tuple(keep.shape)}")
    keep = keep.bool().cpu()
    probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
    rows: dict[tuple[str, int], tuple[int, int]] = {}
    for b, i in enumerate(idx):
        keys = window_frame_keys(base, i)
        slots = range(len(keys)) if per_frame else (len(keys) // 2,)
        for t in slots:
            if not bool(keep[b, t] if per_frame else keep[b]):
                continue
            if keys[t] in rows:
                raise ValueError(f"au_frame_table: frame {keys[t]} is evaluated twice (windows {rows[keys[t]][0]} and "
                                 f"{i}; expected every frame once, e.g. stride T or eval_cover)")
            rows[keys[t]] = (b, t)
    if not rows:
        raise ValueError("au_frame_table: no evaluated frame (expected at least one kept slot, got none)")
    order = sorted(rows)
    src = [rows[k] for k in order]
    b_idx = torch.tensor([b for b, _ in src])
    if per_frame:
        t_idx = torch.tensor([t for _, t in src])
        p, y = probs[b_idx, t_idx], labels[b_idx, t_idx]
    else:
        p, y = probs[b_idx], labels[b_idx]
    seg = [0]
    for (s0, f0), (s1, f1) in zip(order, order[1:]):
        seg.append(seg[-1] + int(s1 != s0 or f1 != f0 + 1))
    return {"probs": p, "target": y.round().long(), "segment_ids": torch.tensor(seg, dtype=torch.long), "keys": order}
