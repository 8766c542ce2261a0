"""HeterogeneousLoader: lockstep pairs, epoch length, restarts, fractions, DistributedSampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset, WeightedRandomSampler

from facelayers.data import HeterogeneousLoader, fraction_indices, fraction_subset


class Ids(Dataset):
    """Item i is the tensor i; records set_epoch calls."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)

    def set_epoch(self, e: int) -> None:
        self.epochs.append(e)


def _ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b]


def test_epoch_length_pairs_and_restart():
    exp = DataLoader(Ids(10), batch_size=4)  # 3 batches
    au = DataLoader(Ids(7), batch_size=1)  # 7 batches
    pairs = HeterogeneousLoader(exp, au)
    assert len(pairs) == 7
    steps = list(pairs)
    assert len(steps) == 7
    assert all(isinstance(s, tuple) and len(s) == 2 for s in steps)
    assert _ids(a for _, a in steps) == list(range(7))  # longer side: exactly one pass
    exp_batches = [e.tolist() for e, _ in steps]
    assert exp_batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2 + [[0, 1, 2, 3]]  # shorter restarts
    assert pairs.passes_per_epoch() == (3, 1)
    # the expression dataset saw passes 0, 1, 2 of epoch 0; next epoch continues at 3
    assert exp.dataset.epochs == [0, 1, 2]
    list(pairs)
    assert exp.dataset.epochs == [0, 1, 2, 3, 4, 5] and au.dataset.epochs == [0, 1]


@given(n_exp=st.integers(1, 40), n_au=st.integers(1, 40), b_exp=st.integers(1, 8), b_au=st.integers(1, 8))
def test_length_is_longer_loader(n_exp, n_au, b_exp, b_au):
    exp, au = DataLoader(Ids(n_exp), batch_size=b_exp), DataLoader(Ids(n_au), batch_size=b_au)
    pairs = HeterogeneousLoader(exp, au)
    assert len(pairs) == max(len(exp), len(au))
    steps = list(pairs)
    assert len(steps) == len(pairs)
    longer = 0 if len(exp) >= len(au) else 1
    assert sorted(_ids(s[longer] for s in steps)) == list(range([n_exp, n_au][longer]))


def test_set_epoch_reshuffles_and_is_reproducible():
    def make():
        exp = DataLoader(Ids(12), batch_size=3, sampler=DistributedSampler(Ids(12), num_replicas=1, rank=0, seed=1))
        au = DataLoader(Ids(5), batch_size=5, sampler=DistributedSampler(Ids(5), num_replicas=1, rank=0, seed=1))
        return HeterogeneousLoader(exp, au)

    a, b = make(), make()
    a0 = [(e.tolist(), u.tolist()) for e, u in a]
    a1 = [(e.tolist(), u.tolist()) for e, u in a]
    b.set_epoch(1)
    b1 = [(e.tolist(), u.tolist()) for e, u in b]
    assert a1 == b1, "epoch 1 must not depend on having iterated epoch 0"
    assert a0 != a1
    # AU side restarts within the epoch with a new pass index -> different order on each pass
    au_passes = [u for _, u in a0]
    assert len(au_passes) == 4 and sorted(au_passes[0]) == list(range(5))
    assert len({tuple(p) for p in au_passes}) > 1
    assert a.au_loader.sampler.epoch == 7  # epoch 1, 4 passes per epoch: passes 4..7


def test_fraction_indices_deterministic_nested():
    a = fraction_indices(100, 0.3, seed=4)
    assert a == fraction_indices(100, 0.3, seed=4) and len(a) == 30 and a == sorted(a)
    assert set(fraction_indices(100, 0.1, seed=4)) <= set(a)
    assert fraction_indices(100, 0.3, seed=5) != a
    assert len(fraction_indices(3, 0.01)) == 1
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            fraction_indices(10, bad)
    ds = Ids(10)
    assert fraction_subset(ds, 1.0) is ds
    sub = fraction_subset(ds, 0.5, seed=1)
    assert isinstance(sub, Subset) and list(sub.indices) == fraction_indices(10, 0.5, 1)


def test_fractions_subsample_each_side():
    exp = DataLoader(Ids(40), batch_size=4, shuffle=True, num_workers=0)
    au = DataLoader(Ids(20), batch_size=2)
    pairs = HeterogeneousLoader(exp, au, exp_fraction=0.25, au_fraction=0.5, seed=3)
    assert len(pairs.exp_loader.dataset) == 10 and len(pairs.au_loader.dataset) == 10
    assert len(pairs) == 5  # exp: 10/4 -> 3 batches; au: 10/2 -> 5
    assert pairs.exp_loader.batch_size == 4 and isinstance(pairs.exp_loader.sampler, torch.utils.data.RandomSampler)
    steps = list(pairs)
    assert set(_ids(e for e, _ in steps)) == set(fraction_indices(40, 0.25, 3))
    assert _ids(a for _, a in steps) == fraction_indices(20, 0.5, 3)  # sequential sampler kept
    assert pairs.exp_loader.dataset.dataset.epochs, "set_epoch must reach the dataset inside the Subset"


def test_fraction_with_distributed_sampler_same_subset_on_every_rank():
    ds = Ids(30)
    seen = []
    for rank in range(2):
        exp = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=rank, seed=9))
        au = DataLoader(Ids(8), batch_size=2)
        pairs = HeterogeneousLoader(exp, au, exp_fraction=0.4, seed=11)
        sampler = pairs.exp_loader.sampler
        assert isinstance(sampler, DistributedSampler)
        assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.shuffle) == (2, rank, 9, True)
        assert len(pairs.exp_loader.dataset) == 12 and len(pairs.exp_loader) == 3
        pairs.set_epoch(2)
        rank_ids = _ids(e for e, _ in pairs)
        assert sampler.epoch == 2 * pairs.passes_per_epoch()[0] + pairs.passes_per_epoch()[0] - 1
        seen.append(rank_ids[:6])  # first pass on this rank
    # the two ranks split the same 12-item subset between them, without overlap
    assert sorted(seen[0] + seen[1]) == fraction_indices(30, 0.4, 11)


def test_errors():
    with pytest.raises(ValueError, match="no batches"):
        HeterogeneousLoader(DataLoader(Ids(3), batch_size=4, drop_last=True), DataLoader(Ids(3)))
    with pytest.raises(ValueError, match="exp_fraction"):
        HeterogeneousLoader(DataLoader(Ids(3)), DataLoader(Ids(3)), exp_fraction=0)
    weighted = DataLoader(Ids(4), sampler=WeightedRandomSampler([1.0] * 4, 4))
    with pytest.raises(ValueError, match="fraction_subset"):
        HeterogeneousLoader(weighted, DataLoader(Ids(3)), exp_fraction=0.5)
    with pytest.raises(TypeError, match="DataLoader"):
        HeterogeneousLoader([[1], [2]], DataLoader(Ids(3)), exp_fraction=0.5)
    # plain re-iterables with len work when no fraction is asked for
    steps = list(HeterogeneousLoader([torch.zeros(1)] * 2, DataLoader(TensorDataset(torch.arange(3.0)))))
    assert len(steps) == 3


@pytest.mark.parametrize("workers", [0, 1])
def test_end_to_end_with_real_datasets(tmp_path, workers):
    from PIL import Image

    from facelayers.data import AUClipDataset, AURecord, ExpressionClipDataset, ExpressionRecord, train_transform

    for clip, n in (("c0", 5), ("c1", 9)):
        for i in range(n):
            (tmp_path / clip).mkdir(exist_ok=True)
            Image.new("RGB", (12, 10), (i * 20, 0, 0)).save(tmp_path / clip / f"{i}.jpg")
    for f in range(6):
        (tmp_path / "S").mkdir(exist_ok=True)
        Image.new("RGB", (12, 10), (0, f * 20, 0)).save(tmp_path / "S" / f"{f}.jpg")
    exp = ExpressionClipDataset([ExpressionRecord("c0", 5, 1), ExpressionRecord("c1", 9, 2)], tmp_path,
                                num_frames=4, train=True, transform=train_transform(8), seed=0)
    au = AUClipDataset([AURecord(f"S/{f}.jpg", "S", f, (f % 2, 1)) for f in range(6)], tmp_path,
                       num_frames=4, label_mode="all", train=True, transform=train_transform(8), seed=0)
    pairs = HeterogeneousLoader(DataLoader(exp, batch_size=1, shuffle=True, num_workers=workers),
                                DataLoader(au, batch_size=2, num_workers=workers))
    steps = list(pairs)
    assert len(steps) == 2
    e, a = steps[0]
    assert e["clip"].shape == (1, 4, 3, 8, 8) and e["label"].dtype == torch.int64
    assert a["clip"].shape == (2, 4, 3, 8, 8) and a["labels"].shape == (2, 4, 2) and a["mask"].dtype == torch.bool
