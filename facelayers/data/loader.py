"""Pair two task loaders: one expression batch and one AU batch per training step.

The paper trains on heterogeneous datasets by sampling "one batch from each task at every training
step" (Sec. IV-B). :class:`HeterogeneousLoader` does that: an epoch lasts as long as the longer
loader, the shorter one restarts when exhausted, and either side can be subsampled to a fraction
of its dataset (the paper's data-scaling study) in a way that survives ``DistributedSampler``.
:func:`subject_split` carves a subject-independent validation split from AU training records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler, Subset

from .manifests import AURecord, group_by_subject

__all__ = ["HeterogeneousLoader", "fraction_indices", "fraction_subset", "few_shot_indices", "without_classes_indices",
           "subject_split"]


def _check_fraction(fraction: float, name: str) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (expected 0 < {name} <= 1, got {fraction!r})")
    return float(fraction)


def fraction_indices(size: int, fraction: float, seed: int = 0) -> list[int]:
    """Deterministic subset of ``range(size)``: ``max(1, round(fraction * size))`` indices, sorted.

    The subset depends only on ``(size, fraction, seed)``, so every process of a distributed job
    picks the same one; for one seed, smaller fractions are nested in larger ones (prefixes of
    one permutation).
    """
    fraction = _check_fraction(fraction, "fraction")
    if size < 1:
        raise ValueError(f"cannot take a fraction of an empty dataset (size={size})")
    k = max(1, int(round(fraction * size)))
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:k].tolist())


def fraction_subset(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """``Subset`` of ``dataset`` with :func:`fraction_indices` (the dataset itself when fraction is 1)."""
    fraction = _check_fraction(fraction, "fraction")
    if fraction == 1.0:
        return dataset
    if not isinstance(dataset, Sized):
        raise TypeError(f"fraction_subset needs a dataset with len() (expected a sized dataset, got {type(dataset).__name__})")
    return Subset(dataset, fraction_indices(len(dataset), fraction, seed))


def _int_labels(labels: Any) -> list[int]:
    if torch.is_tensor(labels):
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor (expected shape [N] int, got shape "
                             f"{tuple(labels.shape)} {labels.dtype})")
        return [int(v) for v in labels.tolist()]
    out = []
    for v in labels:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"labels must be integers (expected int class ids, got {type(v).__name__} {v!r})")
        out.append(int(v))
    return out


def few_shot_indices(labels: Any, k: int, seed: int = 0, *, classes: Iterable[int] | None = None) -> list[int]:
    """Deterministic k-shot subset: ``k`` items of each class, sorted.

    For each class (ascending id) the items are drawn with one seeded permutation
    (``torch.randperm`` with ``seed + class id``), so the draw depends only on
    ``(labels, k, seed)`` and, for one seed, a smaller ``k`` keeps a subset of a larger one.

    Args:
        labels: ``[N]`` integer class ids of the items (a tensor or a sequence of ints).
        k: Items per class, >= 1.
        seed: Seed of the draw.
        classes: Class ids that must each get ``k`` items (default: every class present in
            ``labels``); items of other classes are not drawn.

    Returns:
        The chosen item indices, ascending (``k * len(classes)`` of them).

    Raises:
        ValueError: ``k < 1``, non-integer labels, or a class with fewer than ``k`` items
            (naming the class and its count).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (expected items per class >= 1, got {k!r})")
    labels = _int_labels(labels)
    wanted = sorted(set(labels)) if classes is None else sorted({int(c) for c in classes})
    if not wanted:
        raise ValueError("few_shot_indices: no class to draw from (expected at least one labelled item, got none)")
    by_class: dict[int, list[int]] = {c: [] for c in wanted}
    for i, c in enumerate(labels):
        if c in by_class:
            by_class[c].append(i)
    short = {c: len(v) for c, v in by_class.items() if len(v) < k}
    if short:
        raise ValueError(f"few_shot_indices: {len(short)} class(es) have fewer than k={k} items (expected >= {k} per "
                         f"class, got {short} as class id: count)")
    out: list[int] = []
    for c, idx in by_class.items():
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(int(seed) + c)).tolist()
        out += [idx[j] for j in perm[:k]]
    return sorted(out)


def without_classes_indices(labels: Any, exclude: Iterable[int]) -> list[int]:
    """Indices of the items whose class is not in ``exclude`` (ascending), e.g. the training clips
    of the seen classes in an unseen-class setting.

    Raises:
        ValueError: non-integer labels, or nothing left (expected at least one item of another class).
    """
    labels = _int_labels(labels)
    drop = {int(c) for c in exclude}
    keep = [i for i, c in enumerate(labels) if c not in drop]
    if labels and not keep:
        raise ValueError(f"without_classes_indices: every item is of an excluded class (expected at least one item of "
                         f"a class other than {sorted(drop)}, got none of {len(labels)})")
    return keep


def subject_split(
    records: Iterable[AURecord], val_fraction: float, seed: int = 0, *, format: str | None = None
) -> tuple[list[AURecord], list[AURecord]]:
    """Split AU records by person: no subject has records on both sides.

    Subjects (:attr:`AURecord.subject`, see :func:`facelayers.data.group_by_subject`) are sorted,
    ``k = min(n - 1, max(1, round(val_fraction * n)))`` of the ``n`` subjects are drawn with a
    seeded permutation (``torch.randperm`` with ``seed``; the same on every platform and process)
    and all their records go to validation.

    Args:
        records: AU records, e.g. ``read_manifest(train_list, "bp4d")``.
        val_fraction: Fraction of the *subjects* held out, in (0, 1).
        seed: Seed of the draw.
        format: ``"bp4d"``/``"disfa"`` to parse subjects of hand-built records (``subject=None``).

    Returns:
        ``(train_records, val_records)``, each in input order.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), fewer than 2 subjects, or a record without a
            subject (see :func:`facelayers.data.group_by_subject`).

    Examples::

        >>> train, val = subject_split(read_manifest("splits/bp4d/train_1f_data.list", "bp4d"), 0.15, seed=0)
        >>> {r.subject for r in train}.isdisjoint(r.subject for r in val)
        True
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1) (expected e.g. 0.15, got {val_fraction!r})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (expected int, got {type(seed).__name__} {seed!r})")
    records = list(records)
    groups = group_by_subject(records, format)
    subjects = list(groups)
    n = len(subjects)
    if n < 2:
        raise ValueError(f"a subject split needs at least 2 subjects (expected >= 2, got {n}: {subjects})")
    k = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {subjects[i] for i in perm[:k]}
    val_ids = {id(r) for s in held_out for r in groups[s]}
    return [r for r in records if id(r) not in val_ids], [r for r in records if id(r) in val_ids]


def _rebuild_with_subset(loader: DataLoader, fraction: float, seed: int, side: str) -> DataLoader:
    """Same DataLoader settings over a fraction of its dataset; the sampler is rebuilt to match."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{side}_fraction < 1 needs a torch DataLoader for {side}_loader (expected DataLoader, got {type(loader).__name__})")
    if loader.batch_size is None:
        raise ValueError(
            f"{side}_fraction < 1 cannot rebuild a DataLoader with a custom batch_sampler; "
            f"subsample its dataset with facelayers.data.fraction_subset instead"
        )
    subset = fraction_subset(loader.dataset, fraction, seed)
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        new_sampler: Any = DistributedSampler(
            subset, num_replicas=sampler.num_replicas, rank=sampler.rank,
            shuffle=sampler.shuffle, seed=sampler.seed, drop_last=sampler.drop_last,
        )
    elif isinstance(sampler, RandomSampler):
        if sampler._num_samples is not None or sampler.replacement:  # noqa: SLF001
            raise ValueError(
                f"{side}_fraction < 1 cannot rebuild a RandomSampler with replacement/num_samples; "
                f"subsample its dataset with facelayers.data.fraction_subset instead"
            )
        new_sampler = RandomSampler(subset, generator=sampler.generator)
    elif isinstance(sampler, SequentialSampler):
        new_sampler = SequentialSampler(subset)
    else:
        raise ValueError(
            f"{side}_fraction < 1 cannot rebuild a {type(sampler).__name__}; subsample the dataset with "
            f"facelayers.data.fraction_subset and build the sampler on the subset"
        )
    kwargs: dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=new_sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(subset, **kwargs)


def _set_epoch(loader: Any, epoch: int) -> None:
    """Propagate ``epoch`` to the loader's sampler(s) and dataset when they have ``set_epoch``."""
    seen = set()
    for obj in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                getattr(loader, "batch_sampler", None)):
        if obj is not None and id(obj) not in seen and hasattr(obj, "set_epoch"):
            seen.add(id(obj))
            obj.set_epoch(epoch)
    ds = getattr(loader, "dataset", None)
    while isinstance(ds, Subset):
        ds = ds.dataset
    if ds is not None and hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)


class HeterogeneousLoader:
    """Iterate two loaders in lockstep: ``(exp_batch, au_batch)`` per step.

    * One epoch has ``len(self) = max(len(exp_loader), len(au_loader))`` steps.
    * The shorter loader restarts (a fresh pass, reshuffled) whenever it is exhausted.
    * ``exp_fraction`` / ``au_fraction`` < 1 keep a deterministic subset of that side's dataset
      (:func:`fraction_indices` with ``seed``): the DataLoader is rebuilt over a ``Subset`` with
      the same settings and a matching sampler (``DistributedSampler`` keeps its replicas, rank,
      shuffle, seed, drop_last), so each rank draws from the same subset.
    * Epochs: each ``iter()`` uses the current epoch and then advances it; :meth:`set_epoch`
      selects it explicitly (as with ``DistributedSampler``). Every pass over a side calls
      ``set_epoch(pass_index)`` on its sampler and dataset when they have one, with
      ``pass_index = epoch * passes_per_epoch + r`` (``r``-th pass in this epoch,
      ``passes_per_epoch = ceil(len(self) / len(side))``), so restarts reshuffle and a resumed run
      reproduces the order.

    Args:
        exp_loader: Loader of expression batches (any re-iterable with ``len``; a DataLoader when
            ``exp_fraction < 1``).
        au_loader: Loader of AU batches.
        exp_fraction: Fraction of the expression dataset kept, in (0, 1].
        au_fraction: Fraction of the AU dataset kept, in (0, 1].
        seed: Seed of the subset choice.

    Examples::

        >>> pairs = HeterogeneousLoader(DataLoader(exp_ds, 12, shuffle=True), DataLoader(au_ds, 128, shuffle=True))
        >>> for exp_batch, au_batch in pairs:
        ...     ...
    """

    def __init__(
        self, exp_loader: Any, au_loader: Any, *, exp_fraction: float = 1.0, au_fraction: float = 1.0, seed: int = 0
    ) -> None:
        self.exp_fraction = _check_fraction(exp_fraction, "exp_fraction")
        self.au_fraction = _check_fraction(au_fraction, "au_fraction")
        self.seed = int(seed)
        if self.exp_fraction < 1.0:
            exp_loader = _rebuild_with_subset(exp_loader, self.exp_fraction, self.seed, "exp")
        if self.au_fraction < 1.0:
            au_loader = _rebuild_with_subset(au_loader, self.au_fraction, self.seed, "au")
        for side, ld in (("exp_loader", exp_loader), ("au_loader", au_loader)):
            if not isinstance(ld, Sized):
                raise TypeError(f"{side} must have a length (expected an object with len(), got {type(ld).__name__})")
            if len(ld) == 0:
                raise ValueError(f"{side} yields no batches; check its dataset, batch_size and drop_last (expected len >= 1, got len 0)")
        self.exp_loader = exp_loader
        self.au_loader = au_loader
        self.epoch = 0

    def __len__(self) -> int:
        return max(len(self.exp_loader), len(self.au_loader))

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (later iterations continue from it)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0 (expected an int >= 0, got {epoch})")
        self.epoch = int(epoch)

    def passes_per_epoch(self) -> tuple[int, int]:
        """``(expression, AU)`` passes started per epoch."""
        n = len(self)
        return math.ceil(n / len(self.exp_loader)), math.ceil(n / len(self.au_loader))

    def _side(self, loader: Any, epoch: int, per_epoch: int) -> Iterator[Any]:
        r = 0
        while True:
            _set_epoch(loader, epoch * per_epoch + r)
            got = False
            for batch in loader:
                got = True
                yield batch
            if not got:
                raise RuntimeError(f"{type(loader).__name__} yielded no batch in a pass although len() > 0")
            r += 1

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        epoch = self.epoch
        self.epoch += 1
        pe, pa = self.passes_per_epoch()
        exp_it = self._side(self.exp_loader, epoch, pe)
        au_it = self._side(self.au_loader, epoch, pa)
        for _ in range(len(self)):
            yield next(exp_it), next(au_it)

    def __repr__(self) -> str:
        return (
            f"HeterogeneousLoader(steps={len(self)}, exp_batches={len(self.exp_loader)}, "
            f"au_batches={len(self.au_loader)}, exp_fraction={self.exp_fraction}, "
            f"au_fraction={self.au_fraction}, seed={self.seed})"
        )
