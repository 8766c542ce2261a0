"""Synthetic FACS benchmark: renderer, AU deformations, domains, splits, datasets, export round trip."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from facelayers import facs
from facelayers.data import AUClipDataset, AURecord, ExpressionClipDataset, read_manifest
from facelayers.data.synthetic import (
    AU_ACTIVE_THRESHOLD,
    AU_DEFORMATIONS,
    RENDERED_AUS,
    SyntheticAUDataset,
    SyntheticExpressionDataset,
    generate_lab_sequences,
    generate_wild_clips,
    render_faces,
    sample_identities,
)
from facelayers.data.synthetic.figure import sample_grid
from facelayers.data.synthetic.render import render_au_apexes

torch.set_num_threads(1)  # the renderer is single-threaded anyway; keeps the tests stable on busy CPUs

TINY_AU = dict(num_subjects=5, num_folds=2, num_frames=4, image_size=16, sequences_per_subject=1, sequence_length=12)
TINY_EXP = dict(num_clips=5 * 7, num_frames=4, image_size=16, num_folds=5, class_balance="uniform")


def _apex_deltas(image_size: int = 32, identities: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neutral [I, 3, S, S], deltas [I, A, 3, S, S])``: each AU at intensity 1 minus neutral."""
    ids = sample_identities(identities, generator=torch.Generator().manual_seed(seed))
    imgs = render_au_apexes(ids, image_size=image_size)
    return imgs[:, 0], imgs[:, 1:] - imgs[:, :1]


# ----------------------------------------------------------------------------------------------
# vocabulary and renderer


def test_rendered_aus_are_table_s4_and_cover_dataset_vocabularies():
    assert RENDERED_AUS == tuple(facs.TABLE_S4_AUS)
    assert set(facs.BP4D_AUS) <= set(RENDERED_AUS)
    assert set(facs.DISFA_AUS) <= set(RENDERED_AUS)
    assert set(AU_DEFORMATIONS) == set(RENDERED_AUS)
    for name in facs.EXPRESSIONS_11:
        assert set(facs.EXPRESSIONS[name].aus) <= set(RENDERED_AUS), name


@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([8, 17, 32]), n=st.integers(1, 5))
def test_render_shapes_range_and_determinism(seed, size, n):
    g = torch.Generator().manual_seed(seed)
    ids = sample_identities(n, generator=g)
    au = torch.rand(n, len(RENDERED_AUS), generator=g)
    a = render_faces(ids, au, image_size=size)
    b = render_faces(ids, au, image_size=size, chunk_size=2)
    assert a.shape == (n, 3, size, size) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg="chunking changed the rendered pixels")


def test_render_rejects_bad_input():
    ids = sample_identities(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[N, 17\]"):
        render_faces(ids, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="expected 3"):
        render_faces(ids, torch.zeros(3, len(RENDERED_AUS)))
    with pytest.raises(ValueError, match="image_size"):
        render_faces(ids, torch.zeros(2, len(RENDERED_AUS)), image_size=2)


def test_every_au_changes_the_face_noticeably_and_differently():
    """Per-AU apex deltas (AU at 1 minus neutral, 32 px) are large and pairwise distinct."""
    neutral, deltas = _apex_deltas(image_size=32)
    I, A = deltas.shape[:2]
    flat = deltas.reshape(I, A, -1)
    # noticeable: at least 6 pixels change by more than 0.05 (13/255) for every identity
    changed = (flat.abs() > 0.05).sum(-1)  # [I, A]
    for i, j in itertools.product(range(I), range(A)):
        assert changed[i, j] >= 6, f"AU{RENDERED_AUS[j]} (identity {i}) changes only {int(changed[i, j])} pixels"
    # distinct: the difference of two AUs' deltas is a large fraction of the larger delta
    norms = flat.norm(dim=-1)  # [I, A]
    worst = (1.0, None)
    for a, b in itertools.combinations(range(A), 2):
        ratio = ((flat[:, a] - flat[:, b]).norm(dim=-1) / torch.maximum(norms[:, a], norms[:, b])).min().item()
        if ratio < worst[0]:
            worst = (ratio, (RENDERED_AUS[a], RENDERED_AUS[b]))
    assert worst[0] > 0.5, f"AU{worst[1][0]} and AU{worst[1][1]} look alike: relative delta difference {worst[0]:.3f}"


def test_intensity_scales_the_deformation():
    ids = sample_identities(1, generator=torch.Generator().manual_seed(3))
    A = len(RENDERED_AUS)
    for j, code in enumerate(RENDERED_AUS):
        au = torch.zeros(3, A)
        au[1, j], au[2, j] = 0.4, 1.0
        img = render_faces({k: v.expand(3, *v.shape[1:]) for k, v in ids.items()}, au, image_size=32)
        half, full = (img[1] - img[0]).norm(), (img[2] - img[0]).norm()
        assert 0 < half < full, f"AU{code}: |delta(0.4)|={half:.3f} should be in (0, |delta(1)|={full:.3f})"


def test_aus_combine():
    """Two AUs of different regions together change the face like the sum of each alone."""
    ids = sample_identities(1, generator=torch.Generator().manual_seed(1))
    A = len(RENDERED_AUS)
    au = torch.zeros(4, A)
    i1, i12 = RENDERED_AUS.index(1), RENDERED_AUS.index(12)
    au[1, i1] = 1
    au[2, i12] = 1
    au[3, i1] = au[3, i12] = 1
    img = render_faces({k: v.expand(4, *v.shape[1:]) for k, v in ids.items()}, au, image_size=32)
    both = img[3] - img[0]
    summed = (img[1] - img[0]) + (img[2] - img[0])
    assert (both - summed).norm() < 0.35 * summed.norm()
    assert (both - (img[1] - img[0])).norm() > 0.5 * (img[2] - img[0]).norm()


# ----------------------------------------------------------------------------------------------
# domains


def test_lab_labels_follow_the_threshold_and_episodes_have_dynamics():
    lab = generate_lab_sequences([0, 1], aus=facs.DISFA_AUS, sequences_per_subject=1, sequence_length=80, image_size=16, seed=4)
    cols = [RENDERED_AUS.index(a) for a in facs.DISFA_AUS]
    expected = (lab.intensity[:, cols] >= AU_ACTIVE_THRESHOLD).float()
    assert torch.equal(lab.labels, expected)
    assert lab.labels.shape == (160, 8) and lab.frames.shape == (160, 3, 16, 16) and lab.frames.dtype == torch.uint8
    assert 0.15 < lab.labels.mean() < 0.6, "AU base rate out of the designed range"
    # onset-apex-offset: intensities ramp (some frames strictly between 0 and the apex)
    x = lab.intensity[:, cols]
    assert ((x > 0.05) & (x < AU_ACTIVE_THRESHOLD)).any() and (x > 0.9).any()


def test_subject_subsets_render_identically():
    a = generate_lab_sequences([2, 7], sequence_length=6, image_size=16, seed=9)
    b = generate_lab_sequences([7], sequence_length=6, image_size=16, seed=9)
    assert torch.equal(a.frames[12:], b.frames)
    c = generate_wild_clips([3, 11], [0, 4], num_frames=3, image_size=16, seed=2)
    d = generate_wild_clips([11], [4], num_frames=3, image_size=16, seed=2)
    assert torch.equal(c.frames[1:], d.frames)


def test_wild_clips_use_table_s4_compositions_with_noise():
    exprs = facs.EXPRESSIONS_7
    labels = [k for k in range(7) for _ in range(12)]
    w = generate_wild_clips(list(range(len(labels))), labels, expressions=exprs, num_frames=6, image_size=8, seed=0)
    peak = w.intensity.amax(1)  # [N, A]
    in_comp = torch.zeros_like(peak, dtype=torch.bool)
    for n, k in enumerate(labels):
        for a in facs.EXPRESSIONS[exprs[k]].aus:
            in_comp[n, RENDERED_AUS.index(a)] = True
    # most composition AUs are present, some dropped; extra AUs appear sometimes but weaker
    present = (peak > 0)[in_comp].float().mean()
    assert 0.7 < present < 1.0, present
    extra = peak[~in_comp]
    assert (extra > 0).any() and extra.max() <= 0.45 + 1e-6
    neutral = [n for n, k in enumerate(labels) if exprs[k] == "neutral"]
    assert peak[neutral].max() <= 0.45 + 1e-6


# ----------------------------------------------------------------------------------------------
# datasets


def test_au_dataset_items_splits_and_labels():
    sets = {s: SyntheticAUDataset(split=s, seed=1, **TINY_AU) for s in ("train", "val", "test")}
    subj = {s: set(d.subjects) for s, d in sets.items()}
    assert not (subj["train"] & subj["test"]) and not (subj["val"] & subj["test"]) and not (subj["train"] & subj["val"])
    assert subj["train"] | subj["val"] | subj["test"] == set(range(5))
    assert all(subj.values())
    d = sets["test"]
    item = d[0]
    assert set(item) == {"clip", "labels", "mask", "index"}
    assert item["clip"].shape == (4, 3, 16, 16) and item["clip"].dtype == torch.float32
    assert item["labels"].shape == (12,) and item["labels"].dtype == torch.float32
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (4,)
    rows, _ = d.window_rows(0)
    assert torch.equal(item["labels"], d.frame_labels[rows[2]])
    full = SyntheticAUDataset(split="test", seed=1, label_mode="all", aus=facs.DISFA_AUS, **TINY_AU)
    it = full[len(full) - 1]
    assert it["labels"].shape == (4, 8)
    assert int(it["mask"].sum()) >= 1
    with pytest.raises(ValueError, match="split"):
        SyntheticAUDataset(split="dev", **TINY_AU)
    with pytest.raises(KeyError, match="rendered"):
        SyntheticAUDataset(split="test", aus=(1, 43), **TINY_AU)


@example(seed=0, mode="center", t=4, stride=2, length=10, takes=2)  # the reported case (issue 7)
@given(
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["center", "all"]),
    t=st.integers(1, 6),
    stride=st.integers(1, 6),
    length=st.integers(1, 13),
    takes=st.integers(1, 3),
)
def test_au_train_windows_never_leave_their_take(seed, mode, t, stride, length, takes):
    """Train-mode shifts keep every slot inside the window's own take (also the last one), and
    the planned + shifted windows are exactly those of ``AUClipDataset`` on the same takes."""
    d = SyntheticAUDataset(
        split="train", seed=seed % 5, item_seed=seed, label_mode=mode, stride=stride, num_frames=t,
        num_subjects=3, num_folds=2, fold=1, val_subjects=0, image_size=8,
        sequences_per_subject=takes, sequence_length=length,
    )  # fmt: skip
    assert d.train and len(d.data.lengths) == 2 * takes
    # the real loader over the same takes, one sequence per take, frame numbers 0 .. L-1
    records = [
        AURecord(path=f"t{k}/{j}.png", sequence=f"t{k}", frame_index=j, labels=(0,))
        for k, n in enumerate(d.data.lengths)
        for j in range(n)
    ]
    real = AUClipDataset(records, "unused", num_frames=t, label_mode=mode, train=True, stride=stride)
    assert len(d) == len(real)
    for i in range(len(d)):
        k = d.window_take(i)
        lo, hi = d.data.starts[k], d.data.starts[k] + d.data.lengths[k]
        item = d[i]  # must not raise, also for the windows of the last take
        own = d.frames[lo:hi].float() / 255  # [L, 3, H, W]
        from_own = (item["clip"][:, None] == own[None]).flatten(2).all(-1).any(-1)  # [T]
        bad = (~from_own).nonzero().flatten().tolist()
        assert not bad, f"window {i} (take {k}): slots {bad} are not frames of its take"
        for s in range(3):
            rows, mask = d.window_rows(i, torch.Generator().manual_seed(s))
            inside = lo <= int(rows.min()) and int(rows.max()) < hi
            assert inside, f"window {i} draw {s}: rows {rows.tolist()} leave take {k} = rows [{lo}, {hi})"
            recs, real_mask = real.window_frames(i, torch.Generator().manual_seed(s))
            assert {r.sequence for r in recs} == {f"t{k}"}, f"window {i}: real loader reads another take"
            expected = [r.frame_index for r in recs]
            assert (rows - lo).tolist() == expected, f"window {i} draw {s}: frames differ from AUClipDataset"
            assert mask.tolist() == list(real_mask), f"window {i} draw {s}: mask differs from AUClipDataset"
            assert bool(mask[t // 2]) or mode == "all", f"window {i}: centre slot is padding"


def test_expression_dataset_items_splits_and_imbalance():
    sets = {s: SyntheticExpressionDataset(split=s, seed=2, **TINY_EXP) for s in ("train", "val", "test")}
    ids = {s: set(d.clip_ids.tolist()) for s, d in sets.items()}
    assert not any(ids[a] & ids[b] for a, b in itertools.combinations(ids, 2))
    assert set().union(*ids.values()) == set(range(35))
    assert set(sets["test"].labels.tolist()) == set(range(7)), "stratified test fold lacks a class"
    item = sets["test"][0]
    assert set(item) == {"clip", "label", "index"}
    assert item["clip"].shape == (4, 3, 16, 16) and 0 <= item["clip"].min() and item["clip"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    # DFEW-like imbalance (labels only: nothing is rendered for the counts)
    from facelayers.data.synthetic.domains import class_counts

    counts = class_counts(1000, facs.EXPRESSIONS_7, "dfew")
    assert sum(counts) == 1000
    assert counts[0] > counts[2] > counts[4] > counts[6] > counts[5] >= 5  # happy > neutral > surprise > fear > disgust
    assert len(class_counts(200, facs.EXPRESSIONS_11, "dfew")) == 11


def test_datasets_are_deterministic_by_seed():
    a = SyntheticExpressionDataset(split="val", seed=5, **TINY_EXP)
    b = SyntheticExpressionDataset(split="val", seed=5, **TINY_EXP)
    c = SyntheticExpressionDataset(split="val", seed=6, **TINY_EXP)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.frames, c.frames)
    x = SyntheticAUDataset(split="test", seed=5, **TINY_AU)
    y = SyntheticAUDataset(split="test", seed=5, **TINY_AU)
    assert torch.equal(x.frames, y.frames) and torch.equal(x.frame_labels, y.frame_labels)


def test_transform_is_applied_to_the_float_clip():
    d = SyntheticExpressionDataset(split="test", seed=0, transform=lambda c: c * 2 - 1, **TINY_EXP)
    raw = d.frames[0].float() / 255
    torch.testing.assert_close(d[0]["clip"], raw * 2 - 1)


# ----------------------------------------------------------------------------------------------
# export -> real loaders


def test_expression_export_reads_back_exactly(tmp_path):
    d = SyntheticExpressionDataset(split="test", seed=3, **TINY_EXP)
    manifest = d.export(tmp_path, format="dfew")
    recs = read_manifest(manifest, "dfew")
    assert [r.label for r in recs] == d.labels.tolist()
    real = ExpressionClipDataset(recs, tmp_path, num_frames=d.num_frames, train=False)
    assert len(real) == len(d)
    for i in range(len(d)):
        a, b = d[i], real[i]
        assert torch.equal(a["clip"], b["clip"]), f"clip {i} differs after PNG round trip"
        assert torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("fmt,label_mode", [("bp4d", "center"), ("disfa", "all")])
def test_au_export_reads_back_exactly(tmp_path, fmt, label_mode):
    aus = facs.BP4D_AUS if fmt == "bp4d" else facs.DISFA_AUS
    kw = dict(TINY_AU, sequences_per_subject=2, sequence_length=9)
    d = SyntheticAUDataset(split="test", seed=7, aus=aus, label_mode=label_mode, stride=3, **kw)
    manifest = d.export(tmp_path, format=fmt)
    real = AUClipDataset.from_manifest(manifest, fmt, tmp_path, num_frames=d.num_frames, label_mode=label_mode, stride=3)
    assert len(real) == len(d) > 0
    if fmt == "disfa":
        assert len(real.runs) == 2 * len(d.subjects), "takes of one DISFA subject must stay separate runs"
    for i in range(len(d)):
        a, b = d[i], real[i]
        assert torch.equal(a["clip"], b["clip"]), f"window {i} clip differs"
        assert torch.equal(a["labels"], b["labels"]), f"window {i} labels differ"
        assert torch.equal(a["mask"], b["mask"]), f"window {i} mask differs"


def test_au_export_rejects_expression_format(tmp_path):
    d = SyntheticAUDataset(split="test", seed=0, **TINY_AU)
    with pytest.raises(ValueError, match="bp4d"):
        d.export(tmp_path, format="dfew")


def test_figure_grid_shapes():
    au_frames, clean, wild = sample_grid(image_size=12, num_identities=1)
    assert au_frames.shape == (1, 1 + len(RENDERED_AUS), 3, 12, 12)
    assert clean.shape == wild.shape == (7, 3, 12, 12)
