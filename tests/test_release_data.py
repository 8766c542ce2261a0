"""The released SSM code's data choices as options (``--recipe ssm_release``) and its tuned AU F1.

* AU training windows: :func:`facelayers.data.datasets.full_windows` (whole ``T``-frame windows,
  short runs and run tails dropped; released code ``ssm/data/bp4d.py`` / ``disfa.py`` training
  clips), ``AUClipDataset(planner=...)``, the synthetic :class:`FullWindowSubset`.
* Expression frames: :func:`facelayers.data.datasets.release_segment_indices` (released code
  ``ssm/data/emotion.py``), ``ExpressionClipDataset(sampler=...)``.
* No random erasing / CLIP normalisation: ``build_real_datasets(erase_p=0)``.
* Every evaluated AU frame in frame order per segment (:func:`au_frame_table`) and the release's
  tuned AU F1 (:func:`release_tuned_au_f1`) against a brute-force search written here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _testutils import one_thread  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from facelayers.data import AURecord, AUClipDataset, ExpressionClipDataset, ExpressionRecord, segment_indices
from facelayers.data.datasets import au_windows, full_windows, release_segment_indices
from facelayers.data.synthetic import SyntheticAUDataset
from facelayers.models.ssm import data as ssm_data
from facelayers.models.ssm.release_recipe import (
    RELEASE_THRESHOLDS,
    RELEASE_VOTE_WINDOWS,
    release_tuned_au_f1,
    release_vote_fractions,
)


# ------------------------------------------------------------------------------------------------
# expression frames: the release's sampler
# ------------------------------------------------------------------------------------------------
def _release_eval_spec(n: int, t: int) -> list[int]:
    """The release's test ticks, written as the spec reads (float tick, floor of the sample point)."""
    if n <= t:
        return list(range(n)) + [n - 1] * (t - n)
    tick = n / t
    return [int(v) for v in (tick / 2.0 + tick * torch.arange(t, dtype=torch.float64))]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), t=st.integers(1, 24))
def test_release_eval_indices_follow_the_release_ticks(n, t):
    got = release_segment_indices(n, t, train=False)
    assert got == _release_eval_spec(n, t)
    assert len(got) == t and all(0 <= i < n for i in got) and got == sorted(got)


def test_release_eval_indices_examples_and_difference_from_segments():
    # hand-computed from emotion.py's _get_test_indices: tick = 40 / 16 = 2.5 -> int(1.25 + 2.5 k)
    assert release_segment_indices(40, 16, train=False) == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28, 31, 33, 36, 38]
    assert release_segment_indices(16, 16, train=False) == list(range(16))
    assert release_segment_indices(5, 8, train=False) == [0, 1, 2, 3, 4, 4, 4, 4]
    # the library's default sampler picks other frames for some clips (70 = 16 * 4.375: tick 4.375)
    assert release_segment_indices(70, 16, train=False) == [2, 6, 10, 15, 19, 24, 28, 32, 37, 41, 45, 50, 54, 59, 63, 67]
    assert segment_indices(70, 16, train=False) == [2, 6, 10, 15, 19, 23, 28, 32, 37, 41, 45, 50, 54, 58, 63, 67]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), t=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_release_train_indices_lie_in_equal_segments(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    got = release_segment_indices(n, t, train=True, generator=g)
    assert len(got) == t
    if n < t:
        assert got == [min(k, n - 1) for k in range(t)]
        return
    a = n // t
    for k, i in enumerate(got):
        assert k * a <= i < (k + 1) * a, (n, t, got)  # frames past t * a are never read


def test_release_train_indices_reach_every_offset_and_never_the_tail():
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(16)]
    for _ in range(200):
        for k, i in enumerate(release_segment_indices(40, 16, True, g)):
            seen[k].add(i - 2 * k)
    assert all(s == {0, 1} for s in seen)  # a = 40 // 16 = 2: offsets 0 and 1, uniform draws
    # segment_indices covers all 40 frames, the release's sampler never goes past 31
    g = torch.Generator().manual_seed(1)
    assert max(max(release_segment_indices(40, 16, True, g)) for _ in range(100)) == 31
    assert max(max(segment_indices(40, 16, True, g)) for _ in range(100)) == 39
    # seeded: the same generator state gives the same draws
    assert release_segment_indices(70, 16, True, torch.Generator().manual_seed(5)) == \
        release_segment_indices(70, 16, True, torch.Generator().manual_seed(5))


def test_release_sampler_bad_input_is_named():
    with pytest.raises(ValueError, match="num_frames_in_clip"):
        release_segment_indices(0, 16, True)
    with pytest.raises(ValueError, match="num_frames"):
        release_segment_indices(10, 0, False)


def _write_clip(root: Path, name: str, n: int) -> None:
    (root / name).mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 6), (i * 5, 0, 0)).save(root / name / f"{i}.png")


def _frame_ids(clip: torch.Tensor) -> list[int]:
    return [round(float(f[0, 0, 0]) * 255 / 5) for f in clip]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_expression_dataset_reads_the_samplers_frames(tmp_path, fast):
    _write_clip(tmp_path, "a", 40)
    recs = [ExpressionRecord("a", 40, 2)]
    ds = ExpressionClipDataset(recs, tmp_path, num_frames=16, sampler=release_segment_indices, fast_decode=fast)
    assert _frame_ids(ds[0]["clip"]) == release_segment_indices(40, 16, False) == ds.sample_indices(0)
    tr = ExpressionClipDataset(recs, tmp_path, num_frames=16, train=True, seed=3,
                               sampler=release_segment_indices, fast_decode=fast)
    ids = _frame_ids(tr[0]["clip"])
    assert all(2 * k <= i < 2 * k + 2 for k, i in enumerate(ids))
    assert "release_segment_indices" in repr(ds)
    default = ExpressionClipDataset(recs, tmp_path, num_frames=16, fast_decode=fast)
    assert _frame_ids(default[0]["clip"]) == segment_indices(40, 16, False)


def test_expression_dataset_checks_the_sampler(tmp_path):
    _write_clip(tmp_path, "a", 10)
    recs = [ExpressionRecord("a", 10, 0)]
    with pytest.raises(TypeError, match="sampler must be callable"):
        ExpressionClipDataset(recs, tmp_path, num_frames=4, sampler="release")
    bad = ExpressionClipDataset(recs, tmp_path, num_frames=4, sampler=lambda n, t, train, g: [0, 1, 2, n])
    with pytest.raises(ValueError, match=r"expected 4 ints in \[0, 9\]"):
        bad[0]
    short = ExpressionClipDataset(recs, tmp_path, num_frames=4, sampler=lambda n, t, train, g: [0, 1])
    with pytest.raises(ValueError, match="expected 4 ints"):
        short[0]


# ------------------------------------------------------------------------------------------------
# AU training windows: whole windows only
# ------------------------------------------------------------------------------------------------
def _release_training_clips(frames: list[int], clip_len: int, stride: int) -> list[list[int]]:
    """The release's training clip packing, transcribed from its description (bp4d.py / disfa.py):
    split at missing frames, skip segments shorter than clip_len, starts 0, stride, ... <= len - clip_len."""
    segments, cur = [], [frames[0]]
    for f in frames[1:]:
        if f == cur[-1] + 1:
            cur.append(f)
        else:
            segments.append(cur)
            cur = [f]
    segments.append(cur)
    clips = []
    for seg in segments:
        if len(seg) < clip_len:
            continue
        for start in range(0, len(seg) - clip_len + 1, stride):
            clips.append(seg[start:start + clip_len])
    return clips


@settings(max_examples=60, deadline=None)
@given(present=st.sets(st.integers(0, 90), min_size=1, max_size=80), t=st.integers(1, 12),
       stride_mult=st.sampled_from([None, 1, 2]))
def test_full_windows_are_the_release_training_clips(present, t, stride_mult):
    frames = sorted(present)
    stride = t if stride_mult is None else max(1, t * stride_mult // 2)
    want = _release_training_clips(frames, t, stride)
    got = au_windows(frames, t, label_mode="all", stride=stride, planner=full_windows)
    assert [list(w.frames) for w in got] == want
    assert all(all(w.mask) for w in got)  # never a padded slot


def test_full_windows_examples_and_bad_input():
    assert full_windows(40, 16, 16) == [(0, 0), (16, 0)]  # the tail 32..39 is dropped
    assert full_windows(15, 16, 16) == []  # a short run is dropped
    assert full_windows(16, 16, 8) == [(0, 0)]
    for args, needle in (((0, 16, 16), "run_length"), ((10, 0, 16), "num_frames"), ((10, 4, 0), "stride")):
        with pytest.raises(ValueError, match=needle):
            full_windows(*args)


def _recs(frames: list[int], seq: str = "S", m: int = 3) -> list[AURecord]:
    return [AURecord(f"{seq}/{f}.png", seq, f, tuple((f >> b) & 1 for b in range(m))) for f in frames]


def _au_folder(root: Path, recs: list[AURecord]) -> None:
    for r in recs:
        (root / r.sequence).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (r.frame_index, 0, 0)).save(root / r.path)


@pytest.mark.parametrize("mode", ["all", "center"])
def test_au_dataset_with_full_windows_never_pads_or_shifts(tmp_path, mode):
    # one sequence: a 10-frame run (shorter than T: dropped), a 40-frame run (tail 32..39 dropped),
    # then a 35-frame run in a second sequence
    recs = _recs(list(range(0, 10)) + list(range(20, 60))) + _recs(list(range(100, 135)), seq="Q")
    _au_folder(tmp_path, recs)
    ds = AUClipDataset(recs, tmp_path, num_frames=16, label_mode=mode, train=True, seed=0, planner=full_windows)
    starts = [ds.window_frames(i)[0][0].frame_index for i in range(len(ds))]
    assert starts == [20, 36, 100, 116]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert bool(item["mask"].all())
            ids = [round(float(f[0, 0, 0]) * 255) for f in item["clip"]]
            assert ids == list(range(starts[i], starts[i] + 16))  # no random shift in any epoch
            want = torch.tensor([list(r.labels) for r in ds.window_frames(i)[0]], dtype=torch.float32)
            assert torch.equal(item["labels"], want if mode == "all" else want[8])
    assert "planner=full_windows" in repr(ds)
    default = AUClipDataset(recs, tmp_path, num_frames=16, label_mode=mode, train=True, seed=0)
    assert len(default) > len(ds)  # the default planning keeps short runs and run tails (padded)


def test_au_dataset_planner_errors(tmp_path):
    recs = _recs(list(range(10)))
    with pytest.raises(ValueError, match="planned no window.*at most 10 frames for T=16"):
        AUClipDataset(recs, tmp_path, num_frames=16, planner=full_windows)
    with pytest.raises(ValueError, match="expected one of them, got both"):
        AUClipDataset(recs, tmp_path, num_frames=4, planner=full_windows, eval_cover=True)
    with pytest.raises(TypeError, match="planner must be callable"):
        AUClipDataset(recs, tmp_path, num_frames=4, planner="full")
    with pytest.raises(ValueError, match="negative shifts"):
        AUClipDataset(recs, tmp_path, num_frames=4, planner=lambda length, t, s: [(0, -1)])


def _synthetic(split="train", **kw):
    base = dict(split=split, num_subjects=5, num_frames=4, image_size=16, label_mode="all", sequences_per_subject=2,
                sequence_length=10, train=False)
    base.update(kw)
    return SyntheticAUDataset(**base)


def test_synthetic_full_window_subset_is_the_full_windows_plan():
    ds = _synthetic(stride=4)
    sub = ssm_data.FullWindowSubset(ds)
    want = []
    for take, (start, length) in enumerate(zip(ds._starts, ds._lengths)):
        want += [list(range(start + a, start + a + 4)) for a, _ in full_windows(length, 4, 4)]
    assert [ds.window_rows(i)[0].tolist() for i in sub.indices] == want
    assert all(bool(sub[i]["mask"].all()) for i in range(len(sub)))
    sub.set_epoch(3)
    assert ds.epoch == 3
    with pytest.raises(ValueError, match="train=False"):
        ssm_data.FullWindowSubset(_synthetic(train=True))
    with pytest.raises(ValueError, match="no full window"):
        ssm_data.FullWindowSubset(_synthetic(num_frames=16))


def test_build_synthetic_datasets_data_choices():
    kw = dict(frames=4, image_size=16, seed=0, fold=1, quick=True, size=1.0, val_fraction=0.15, tasks=("au",))
    full = ssm_data.build_synthetic_datasets(au_train_windows="full", exp_sampling="release", **kw)
    padded = ssm_data.build_synthetic_datasets(**kw)
    tr = full.train["au"]
    assert isinstance(tr, ssm_data.FullWindowSubset) and all(bool(tr[i]["mask"].all()) for i in range(len(tr)))
    assert not isinstance(padded.train["au"], ssm_data.FullWindowSubset)
    # evaluation is unchanged by the training-window choice
    assert len(full.test["au"]) == len(padded.test["au"]) and len(full.val["au"]) == len(padded.val["au"])
    with pytest.raises(ValueError, match="au_train_windows must be one of"):
        ssm_data.build_synthetic_datasets(au_train_windows="tails", **kw)
    with pytest.raises(ValueError, match="exp_sampling must be one of"):
        ssm_data.build_synthetic_datasets(exp_sampling="tsn", **kw)


def test_build_real_datasets_wires_the_release_choices(tmp_path):
    from facelayers.data import ClipNormalize, ClipRandomErasing
    from facelayers.data.synthetic import SyntheticExpressionDataset
    from facelayers.data.transforms import CLIP_MEAN, CLIP_STD

    au = _synthetic(num_subjects=6, sequence_length=12)
    au_test = _synthetic(split="test", num_subjects=6, sequence_length=12)
    exp_kw = dict(num_clips=35, num_frames=4, image_size=16, seed=0)
    au_m = au.export(tmp_path / "au", format="bp4d", manifest="train.list")
    au_t = au_test.export(tmp_path / "au", format="bp4d", manifest="test.list")
    ex_m = SyntheticExpressionDataset(split="train", **exp_kw).export(tmp_path / "ex", format="dfew", manifest="tr.txt")
    ex_t = SyntheticExpressionDataset(split="test", **exp_kw).export(tmp_path / "ex", format="dfew", manifest="te.txt")
    kw = dict(frames=4, image_size=16, seed=0, val_fraction=0.3, au_dataset="bp4d", au_root=str(tmp_path / "au"),
              au_manifest=str(au_m), au_test_manifest=str(au_t), exp_dataset="dfew", exp_root=str(tmp_path / "ex"),
              exp_manifest=str(ex_m), exp_test_manifest=str(ex_t), au_select="all")
    rel = ssm_data.build_real_datasets(au_train_windows="full", exp_sampling="release", erase_p=0.0, **kw)
    assert rel.train["au"].planner is full_windows and rel.val["au"].planner is None and rel.test["au"].planner is None
    assert all(s.sampler is release_segment_indices for s in (rel.train["exp"], rel.val["exp"], rel.test["exp"]))
    erasing = [t for t in rel.train["exp"].transform.transforms if isinstance(t, ClipRandomErasing)]
    assert [t.p for t in erasing] == [0.0]
    norms = [t for ds in (rel.train["au"], rel.test["au"]) for t in ds.transform.transforms if isinstance(t, ClipNormalize)]
    assert norms and all(tuple(n.mean) == CLIP_MEAN and tuple(n.std) == CLIP_STD for n in norms)
    assert all(bool(rel.train["au"][i]["mask"].all()) for i in range(len(rel.train["au"])))
    default = ssm_data.build_real_datasets(**kw)
    assert default.train["au"].planner is None and default.train["exp"].sampler is segment_indices
    assert [t.p for t in default.train["exp"].transform.transforms if isinstance(t, ClipRandomErasing)] == [0.3]
    # what --val-fraction became: recorded, and a sentence when it cannot follow the fraction
    from facelayers.data import read_manifest

    subjects = {r.subject for r in read_manifest(au_m, "bp4d")}
    v = default.notes["validation"]
    assert v["au"]["total"] == len(subjects) >= 2 and v["au"]["unit"] == "subjects"
    assert v["au"]["held_out"] == min(len(subjects) - 1, max(1, round(0.3 * len(subjects))))
    assert v["exp"]["held_out"] == len(default.val["exp"]) and v["exp"]["total"] == len(default.val["exp"]) + len(
        default.train["exp"])
    small = ssm_data.build_real_datasets(**dict(kw, val_fraction=0.01)).notes["validation"]
    assert small["au"]["held_out"] == 1 and f"holds out 1 of {len(subjects)} subjects" in small["au"]["note"]
    assert v["au"]["note"] is None or abs(v["au"]["effective"] - 0.3) > 0.15


def test_validation_record_notes_only_a_fraction_it_cannot_follow():
    assert ssm_data.validation_record(0.15, 4, 28, "subjects")["note"] is None  # 14 % for 15 %
    rec = ssm_data.validation_record(0.01, 1, 3, "subjects")
    assert rec["effective"] == pytest.approx(1 / 3)
    assert rec["note"] == "--val-fraction 0.01 holds out 1 of 3 subjects (33%): a validation split keeps at least one on each side"
    assert ssm_data.validation_record(0.9, 2, 3, "clips")["note"] is None  # 67 % for 90 %: within half
    assert ssm_data.validation_record(0.9, 1, 3, "clips")["note"] is not None  # 33 % for 90 %


# ------------------------------------------------------------------------------------------------
# every evaluated AU frame in order, and the release's tuned AU F1
# ------------------------------------------------------------------------------------------------
def _items(ds):
    items = [ds[i] for i in range(len(ds))]
    return (torch.tensor([it["index"] for it in items]), torch.stack([it["labels"] for it in items]),
            torch.stack([it["mask"] for it in items]))


def test_au_frame_table_covers_every_frame_once_in_order():
    ds = _synthetic(split="test", sequence_length=10)  # stride T: every frame once as a real slot
    idx, labels, mask = _items(ds)
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))  # any batch order
    probs = labels.double() * 0.5 + 0.25
    tab = ssm_data.au_frame_table(ds, idx[perm], probs[perm], labels[perm], mask[perm])
    assert len(tab["keys"]) == ssm_data.labelled_frame_count(ds) == ds.frame_labels.shape[0]
    assert torch.equal(tab["target"], ds.frame_labels.long())  # rows in frame order
    assert torch.equal(tab["probs"], ds.frame_labels.double() * 0.5 + 0.25)
    assert tab["segment_ids"].tolist() == [s for s in range(len(ds._lengths)) for _ in range(10)]
    # centre outputs (one window per frame, eval_cover) give the same table
    cov = _synthetic(split="test", sequence_length=10, label_mode="center", eval_cover=True)
    idx_c, lab_c, mask_c = _items(cov)
    tab_c = ssm_data.au_frame_table(cov, idx_c, lab_c.double(), lab_c, mask_c[:, 2])
    assert tab_c["keys"] == tab["keys"] and torch.equal(tab_c["target"], tab["target"])
    with pytest.raises(ValueError, match="evaluated twice"):
        ssm_data.au_frame_table(ds, torch.cat([idx, idx[:1]]), torch.cat([probs, probs[:1]]),
                                torch.cat([labels, labels[:1]]), torch.cat([mask, mask[:1]]))
    with pytest.raises(ValueError, match="expected probs and labels"):
        ssm_data.au_frame_table(ds, idx, probs[:, :, :2], labels, mask)


def test_au_frame_table_segments_split_at_gaps_and_sequences(tmp_path):
    recs = _recs([0, 1, 2, 3, 6, 7, 8, 9]) + _recs([0, 1, 2, 3], seq="Q")
    ds = AUClipDataset(recs, tmp_path, num_frames=4, label_mode="all")
    n = len(ds)
    keys = [ssm_data.window_frame_keys(ds, i) for i in range(n)]
    labels = torch.tensor([[list(r.labels) for r in ds.window_frames(i)[0]] for i in range(n)], dtype=torch.float32)
    mask = torch.tensor([ds.window_frames(i)[1] for i in range(n)])
    tab = ssm_data.au_frame_table(ds, torch.arange(n), labels.double(), labels, mask)
    assert tab["keys"] == [("Q", f) for f in range(4)] + [("S", f) for f in (0, 1, 2, 3, 6, 7, 8, 9)]
    assert tab["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert keys[0] == [("S", 0), ("S", 1), ("S", 2), ("S", 3)]
    with pytest.raises(TypeError, match="expected an AUClipDataset or a SyntheticAUDataset"):
        ssm_data.window_frame_keys(object(), 0)


def _brute_force_release_f1(probs: torch.Tensor, target: torch.Tensor, seg: torch.Tensor) -> float:
    """Every (threshold, K, vote count r) of the release's search, votes inside each segment with
    edge frames repeated, F1 of an undefined AU = 0, best plain mean (written frame by frame)."""
    n, m = probs.shape
    ths = torch.tensor([i / 100 for i in range(1, 100)], dtype=torch.float64)
    binary = (probs[None] >= ths[:, None, None]).int()  # [99, n, m]
    first = {int(s): min(i for i in range(n) if int(seg[i]) == int(s)) for s in seg.unique()}
    last = {int(s): max(i for i in range(n) if int(seg[i]) == int(s)) for s in seg.unique()}
    best = -1.0
    for k in range(8):
        counts = torch.zeros_like(binary)
        for i in range(n):
            lo, hi = first[int(seg[i])], last[int(seg[i])]
            for off in range(-k, k + 1):
                counts[:, i] += binary[:, min(max(i + off, lo), hi)]
        for r in range(1, 2 * k + 2):
            pred = counts >= r
            tp = (pred & (target == 1)).sum(1).double()
            fp = (pred & (target == 0)).sum(1).double()
            fn = ((~pred) & (target == 1)).sum(1).double()
            den = 2 * tp + fp + fn
            f1 = torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(den))  # [99, m]
            best = max(best, float(f1.mean(1).max()))
    return best


def _blocks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive blocks whose probabilities alternate high / low, negatives with periodic spikes, and
    blocks that touch segment boundaries: a vote helps, and a vote across segments would differ."""
    seg = torch.tensor([0] * 12 + [1] * 14 + [2] * 10)
    n = len(seg)
    target = torch.zeros(n, 2, dtype=torch.long)
    target[6:12, 0] = target[18:31, 0] = 1
    target[2:9, 1] = target[12:16, 1] = target[30:36, 1] = 1
    i = torch.arange(n)
    alternating = torch.where(i % 2 == 0, 0.8, 0.35).double()[:, None].expand(n, 2)
    spikes = torch.where(i % 4 == 0, 0.7, 0.2).double()[:, None].expand(n, 2)
    noise = 0.05 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (torch.where(target == 1, alternating, spikes) + noise).clamp(0, 1), target, seg


def test_release_tuned_au_f1_is_the_release_search():
    probs, target, seg = _blocks()
    res = release_tuned_au_f1(probs, target, seg)
    assert res["mean"] == pytest.approx(_brute_force_release_f1(probs, target, seg), abs=1e-12)
    assert res["vote_window"] > 0  # the vote matters on these data
    assert res["optimistic"] is True and "optimistic" in res["note"]
    w = 2 * res["vote_window"] + 1
    assert 1 <= res["vote_count"] <= w and res["vote_count"] == math.ceil(res["vote_fraction"] * w - 1e-9)
    # the release's candidates: thresholds 0.01 .. 0.99, K = 0 .. 7
    assert RELEASE_THRESHOLDS == tuple(i / 100 for i in range(1, 100)) and RELEASE_VOTE_WINDOWS == tuple(range(8))
    # never below F1 at 0.5 without a vote (one of its candidates)
    from facelayers.metrics import au_f1

    assert res["mean"] >= float(au_f1(probs, target, zero_division=0.0)["mean"]) - 1e-12
    # random data, one segment, and an AU that never occurs (its undefined F1 counts as 0, as the release)
    g = torch.Generator().manual_seed(1)
    t2 = (torch.rand(12, 2, generator=g) < 0.4).long()
    p2 = (0.5 * t2 + 0.6 * torch.rand(12, 2, generator=g)).clamp(0, 1).double()
    t2, p2 = torch.cat([t2, torch.zeros(12, 1, dtype=torch.long)], 1), torch.cat([p2, torch.zeros(12, 1).double()], 1)
    one = torch.zeros(12, dtype=torch.long)
    assert release_tuned_au_f1(p2, t2)["mean"] == pytest.approx(_brute_force_release_f1(p2, t2, one), abs=1e-12)


def test_release_vote_fractions_are_every_vote_count():
    fr = release_vote_fractions()
    for k in RELEASE_VOTE_WINDOWS:
        w = 2 * k + 1
        rules = {math.ceil(p * w - 1e-9) for p in fr}
        assert set(range(1, w + 1)) <= rules | {w + 1}  # every count 1..W is reachable
    assert release_vote_fractions((0,)) == (1.0,)
