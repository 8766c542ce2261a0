"""Segment sampling, expression clips, AU windows (gaps, padding, coverage), frame decoding."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from facelayers.data import (
    AUClipDataset,
    AURecord,
    ExpressionClipDataset,
    ExpressionRecord,
    FrameCountMismatchError,
    au_windows,
    list_frame_files,
    segment_indices,
    split_runs,
)

# ---------------------------------------------------------------------------------------------
# segment sampling spec


def _bounds(n: int, t: int) -> list[int]:
    return [(k * n) // t for k in range(t + 1)]


EVAL_EXPECTED = {
    1: [0] * 16,
    15: list(range(15)) + [14],
    16: list(range(16)),
    17: list(range(15)) + [16],  # last segment is frames {15, 16}; centre 15 + 2 // 2
    70: [2, 6, 10, 15, 19, 23, 28, 32, 37, 41, 45, 50, 54, 58, 63, 67],
}


@pytest.mark.parametrize("n", [1, 15, 16, 17, 70])
def test_segment_indices_eval(n):
    assert segment_indices(n, 16, train=False) == EVAL_EXPECTED[n]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 70])
def test_segment_indices_train(n):
    t = 16
    seen = [set() for _ in range(t)]
    for seed in range(200):
        idx = segment_indices(n, t, train=True, generator=torch.Generator().manual_seed(seed))
        assert len(idx) == t
        if n < t:
            assert idx == [min(k, n - 1) for k in range(t)]  # edge padding, no randomness
            continue
        assert all(a < b for a, b in zip(idx, idx[1:])), idx
        for k, i in enumerate(idx):
            seen[k].add(i)
    if n >= t:
        b = _bounds(n, t)
        # every frame of every segment is drawn, and nothing outside it
        assert seen == [set(range(b[k], b[k + 1])) for k in range(t)]
    if n == 70:
        assert len(seen[0]) == 4 and len(seen[2]) == 5


def test_segment_indices_reproducible_and_validated():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert segment_indices(70, 8, True, g()) == segment_indices(70, 8, True, g())
    with pytest.raises(ValueError, match="num_frames_in_clip"):
        segment_indices(0, 16, True)
    with pytest.raises(ValueError, match="num_frames"):
        segment_indices(5, 0, False)


@given(n=st.integers(1, 300), t=st.integers(1, 32), seed=st.integers(0, 2**31))
def test_segment_indices_properties(n, t, seed):
    for train in (False, True):
        idx = segment_indices(n, t, train, torch.Generator().manual_seed(seed))
        assert len(idx) == t and all(0 <= i < n for i in idx)
        assert idx == sorted(idx)
        if n >= t:
            b = _bounds(n, t)
            assert all(b[k] <= i < b[k + 1] for k, i in enumerate(idx))


# ---------------------------------------------------------------------------------------------
# frame folders built with PIL


def _write_frame(path: Path, value: int, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, (2 * value) % 256, 255 - value)).save(path)


def _clip_folder(root: Path, name: str, n: int, pattern: str = "{i}.png") -> None:
    for i in range(n):
        _write_frame(root / name / pattern.format(i=i), value=i * 10)


def _frame_values(clip: torch.Tensor) -> list[int]:
    """Frame id encoded in the red channel by _write_frame (value = 10 * i)."""
    return [round(float(f[0, 0, 0]) * 255 / 10) for f in clip]


def test_natural_sort_of_frame_names(tmp_path):
    for name in ["10.png", "2.png", "1.png", "frame_9.jpg", "frame_10.jpg", "notes.txt"]:
        _write_frame(tmp_path / name, 0) if name.endswith(("png", "jpg")) else (tmp_path / name).write_text("x")
    assert list_frame_files(tmp_path) == ["1.png", "2.png", "10.png", "frame_9.jpg", "frame_10.jpg"]
    with pytest.raises(FileNotFoundError):
        list_frame_files(tmp_path / "nope")


def test_expression_dataset_item_contract(tmp_path):
    _clip_folder(tmp_path, "a", 20)
    _clip_folder(tmp_path, "b", 3)
    recs = [ExpressionRecord("a", 20, 4), ExpressionRecord("b", 3, 1)]
    ds = ExpressionClipDataset(recs, tmp_path, num_frames=8)
    item = ds[0]
    assert set(item) == {"clip", "label", "index"}
    assert item["clip"].shape == (8, 3, 6, 8) and item["clip"].dtype == torch.float32
    assert 0.0 <= item["clip"].min() and item["clip"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and int(item["label"]) == 4
    assert item["index"] == 0
    # frames read are the eval segment centres, in natural order (10.png after 9.png)
    assert _frame_values(item["clip"]) == segment_indices(20, 8, False)
    assert _frame_values(ds[1]["clip"]) == [0, 1, 2, 2, 2, 2, 2, 2]
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["clip"].shape == (2, 8, 3, 6, 8) and batch["label"].tolist() == [4, 1]


def test_expression_dataset_seeded_train(tmp_path):
    _clip_folder(tmp_path, "a", 40)
    ds = ExpressionClipDataset([ExpressionRecord("a", 40, 0)], tmp_path, num_frames=4, train=True, seed=7)
    a, b = _frame_values(ds[0]["clip"]), _frame_values(ds[0]["clip"])
    assert a == b
    draws = set()
    for e in range(12):
        ds.set_epoch(e)
        draws.add(tuple(_frame_values(ds[0]["clip"])))
    assert len(draws) > 1


def test_expression_frame_count_mismatch_modes(tmp_path):
    _clip_folder(tmp_path, "a", 5)
    rec = [ExpressionRecord("a", 9, 0)]
    with pytest.warns(UserWarning, match="manifest says 9 frames, found 5"):
        vals = _frame_values(ExpressionClipDataset(rec, tmp_path, num_frames=3)[0]["clip"])
    assert vals == segment_indices(5, 3, False)
    with pytest.warns(UserWarning):
        vals = _frame_values(ExpressionClipDataset(rec, tmp_path, num_frames=3, frame_count="manifest")[0]["clip"])
    assert vals == [min(i, 4) for i in segment_indices(9, 3, False)]
    with pytest.raises(FrameCountMismatchError, match="says 9"):
        ExpressionClipDataset(rec, tmp_path, num_frames=3, frame_count="error")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExpressionClipDataset([ExpressionRecord("a", 5, 0)], tmp_path, num_frames=3, frame_count="error")[0]


def test_expression_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        ExpressionClipDataset([], tmp_path)
    with pytest.raises(TypeError, match="ExpressionRecord"):
        ExpressionClipDataset([AURecord("s/1.jpg", "s", 1, (0,))], tmp_path)
    with pytest.raises(ValueError, match="num_frames"):
        ExpressionClipDataset([ExpressionRecord("a", 1, 0)], tmp_path, num_frames=0)
    ds = ExpressionClipDataset([ExpressionRecord("missing", 3, 0)], tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        ds[0]
    with pytest.raises(IndexError):
        ds[1]


def test_expression_dataset_from_manifest_and_transform(tmp_path):
    _clip_folder(tmp_path / "frames", "00001", 6)
    (tmp_path / "m.txt").write_text("00001 6 2\n")
    calls = []

    def t(clip):
        calls.append(clip.shape)
        return clip * 2

    ds = ExpressionClipDataset.from_manifest(tmp_path / "m.txt", "dfew", tmp_path / "frames", num_frames=4, transform=t)
    assert ds[0]["clip"].max() > 1.0 and calls == [(4, 3, 6, 8)]
    with pytest.raises(ValueError, match="not an expression format"):
        ExpressionClipDataset.from_manifest(tmp_path / "m.txt", "bp4d", tmp_path)


def _write_mp4(path, colours, gop_size: int | None = None) -> None:
    """A 16x16 MPEG-4 file, one frame per RGB colour in ``colours``."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        for rgb in colours:
            for packet in stream.encode(av.VideoFrame.from_image(Image.new("RGB", (16, 16), rgb))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_expression_video_file(tmp_path):
    _write_mp4(tmp_path / "clip.mp4", [(20 * i, 20 * i, 20 * i) for i in range(12)])
    item = ExpressionClipDataset([ExpressionRecord("clip.mp4", 12, 3)], tmp_path, num_frames=4)[0]
    assert item["clip"].shape == (4, 3, 16, 16)
    grey = item["clip"].mean(dim=(1, 2, 3)) * 255 / 20  # ~ frame number
    assert torch.allclose(grey, torch.tensor(segment_indices(12, 4, False), dtype=torch.float32), atol=0.6)


# ---------------------------------------------------------------------------------------------
# AU windows


def _au_records(frames: list[int], seq: str = "S", m: int = 3) -> list[AURecord]:
    return [AURecord(f"{seq}/{f}.png", seq, f, tuple((f >> b) & 1 for b in range(m))) for f in frames]


def _assert_within_one_run(frames: list[int], mask: list[bool], labelled: set[int]) -> None:
    real = [f for f, k in zip(frames, mask) if k]
    assert real, "a window needs at least one real frame"
    assert all(b == a + 1 for a, b in zip(real, real[1:])), f"real frames not consecutive: {frames} {mask}"
    lo, hi = min(frames), max(frames)
    assert set(range(lo, hi + 1)) <= labelled, f"window {frames} spans a missing frame"
    # padding repeats the run edge: everything left of the first real slot equals it, likewise right
    first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
    assert all(f == frames[first] for f in frames[:first]) and all(f == frames[last] for f in frames[last + 1:])
    assert mask[first:last + 1] == [True] * (last - first + 1)


gap_patterns = st.lists(st.booleans(), min_size=1, max_size=70).filter(any)


@given(
    present=gap_patterns,
    offset=st.integers(0, 1000),
    t=st.integers(1, 9),
    stride=st.integers(1, 10),
    mode=st.sampled_from(["center", "all"]),
    cover=st.booleans(),
    train=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_au_windows_never_cross_a_gap(present, offset, t, stride, mode, cover, train, seed):
    frames = [offset + i for i, p in enumerate(present) if p]
    other = [i for i, p in enumerate(present[::-1]) if p]  # a second sequence sharing frame numbers
    labelled = {"S": set(frames), "T": set(other)}
    recs_in = _au_records(frames, "S") + _au_records(other, "T")
    ds = AUClipDataset(recs_in, "unused", num_frames=t, label_mode=mode, stride=stride,
                       eval_cover=cover, train=train)
    g = torch.Generator().manual_seed(seed)
    for i in range(len(ds)):
        recs, mask = ds.window_frames(i, g)
        assert len(recs) == t and len(mask) == t
        (seq,) = {r.sequence for r in recs}
        _assert_within_one_run([r.frame_index for r in recs], mask, labelled[seq])
        if mode == "center":
            assert mask[t // 2], "the centre slot must be a real labelled frame"
    # the pure planner agrees with the dataset's evaluation windows
    if not train:
        plan = au_windows(frames, t, label_mode=mode, stride=stride, eval_cover=cover)
        got = [([r.frame_index for r in ds.window_frames(i)[0]], ds.window_frames(i)[1]) for i in range(len(ds))]
        plan += au_windows(other, t, label_mode=mode, stride=stride, eval_cover=cover)
        assert [(list(w.frames), list(w.mask)) for w in plan] == got


@given(present=gap_patterns, t=st.integers(1, 17), mode=st.sampled_from(["center", "all"]))
def test_eval_cover_each_labelled_frame_once_as_centre(present, t, mode):
    frames = [i for i, p in enumerate(present) if p]
    ws = au_windows(frames, t, label_mode=mode, eval_cover=True)
    assert Counter(w.centre for w in ws) == Counter(frames)
    assert all(w.mask[t // 2] for w in ws)


@given(present=gap_patterns, t=st.integers(1, 17))
def test_all_mode_stride_t_covers_each_frame_once_as_real_slot(present, t):
    frames = [i for i, p in enumerate(present) if p]
    ws = au_windows(frames, t, label_mode="all")
    real = Counter(f for w in ws for f, k in zip(w.frames, w.mask) if k)
    assert real == Counter(frames)


def test_au_windows_spec_examples():
    # run 0..9 then 20..21, T=4, center mode, stride 4: centres at 2, 6 (run 1) and 21 (short run)
    ws = au_windows(list(range(10)) + [20, 21], 4, label_mode="center")
    assert [w.centre for w in ws] == [2, 6, 21]
    assert ws[1].frames == (4, 5, 6, 7) and ws[1].mask == (True,) * 4
    assert ws[2].frames == (20, 20, 21, 21) and ws[2].mask == (False, True, True, False)
    # all mode: starts 0, 4, 8 (last right-padded), short run left-aligned
    ws = au_windows(list(range(10)) + [20, 21], 4, label_mode="all")
    assert [w.frames for w in ws] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 9, 9), (20, 21, 21, 21)]
    assert ws[2].mask == (True, True, False, False)
    assert split_runs([0, 1, 2, 5, 6]) == [[0, 1, 2], [5, 6]]
    with pytest.raises(ValueError, match="strictly increasing"):
        split_runs([3, 3])


def test_au_dataset_items(tmp_path):
    frames = [0, 1, 2, 3, 4, 7, 8]
    for f in frames:
        _write_frame(tmp_path / "S" / f"{f}.png", value=10 * f)
    recs = _au_records(frames)
    ds = AUClipDataset(recs[::-1], tmp_path, num_frames=4, label_mode="center")  # order of records is irrelevant
    assert len(ds) == 2  # run 0-4: centre position 2 (frame 2); run 7-8: centre position min(2, 1) -> frame 8
    item = ds[0]
    assert set(item) == {"clip", "labels", "mask", "index"}
    assert item["clip"].shape == (4, 3, 6, 8) and item["labels"].dtype == torch.float32
    assert item["labels"].tolist() == [0.0, 1.0, 0.0]  # labels of frame 2 (bits of 2)
    assert item["mask"].dtype == torch.bool and item["mask"].tolist() == [True] * 4
    assert _frame_values(item["clip"]) == [0, 1, 2, 3]
    last = ds[1]
    assert _frame_values(last["clip"]) == [7, 7, 8, 8] and last["mask"].tolist() == [False, True, True, False]
    assert last["labels"].tolist() == [0.0, 0.0, 0.0]  # frame 8 = 0b1000 -> bits 0..2 are 0

    ds_all = AUClipDataset(recs, tmp_path, num_frames=4, label_mode="all")
    it = ds_all[1]
    assert it["labels"].shape == (4, 3)
    assert _frame_values(it["clip"]) == [4, 4, 4, 4] and it["mask"].tolist() == [True, False, False, False]
    assert it["labels"][0].tolist() == [0.0, 0.0, 1.0]
    batch = torch.utils.data.default_collate([ds_all[0], ds_all[1]])
    assert batch["labels"].shape == (2, 4, 3) and batch["mask"].shape == (2, 4)


def test_au_dataset_eval_cover_len_and_centres(tmp_path):
    frames = list(range(5)) + list(range(9, 12))
    recs = _au_records(frames, seq="A") + _au_records([0, 1], seq="B")
    ds = AUClipDataset(recs, tmp_path, num_frames=16, eval_cover=True)
    assert len(ds) == len(recs)
    centres = Counter((r[8].sequence, r[8].frame_index) for r in (ds.window_frames(i)[0] for i in range(len(ds))))
    assert centres == Counter((r.sequence, r.frame_index) for r in recs)


def test_au_dataset_train_shift_is_seeded(tmp_path):
    recs = _au_records(list(range(40)))
    ds = AUClipDataset(recs, tmp_path, num_frames=4, label_mode="all", train=True, stride=8)
    starts = {ds.window_frames(0, torch.Generator().manual_seed(s))[0][0].frame_index for s in range(60)}
    assert starts == set(range(8))
    last = len(ds) - 1  # window starting at 32 may shift up to 36 = 40 - 4, never past the end
    ends = {ds.window_frames(last, torch.Generator().manual_seed(s))[0][-1].frame_index for s in range(60)}
    assert max(ends) == 39


def test_au_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        AUClipDataset(_au_records([1, 2]) + _au_records([2]), tmp_path)
    with pytest.raises(ValueError, match="labels"):
        AUClipDataset(_au_records([1], m=3) + _au_records([2], m=4), tmp_path)
    with pytest.raises(ValueError, match="label_mode"):
        AUClipDataset(_au_records([1]), tmp_path, label_mode="middle")
    with pytest.raises(ValueError, match="stride"):
        AUClipDataset(_au_records([1]), tmp_path, stride=0)
    with pytest.raises(TypeError, match="AURecord"):
        AUClipDataset([ExpressionRecord("a", 1, 0)], tmp_path)
    ds = AUClipDataset(_au_records([1]), tmp_path, num_frames=2)
    with pytest.raises(FileNotFoundError, match="1.png"):
        ds[0]


def test_au_dataset_reads_sample_manifests(tmp_path):
    data = Path(__file__).parent / "data"
    ds = AUClipDataset.from_manifest(data / "bp4d_train_1f.sample.list", "bp4d", tmp_path, num_frames=4)
    # sequences in order of first appearance: 2F07_01 (768-772), then 2F04_01 (912-914)
    assert [(r[0].sequence, len(r)) for r in ds.runs] == [("2F07_01", 5), ("2F04_01", 3)]
    assert ds.num_labels == 12
    ds = AUClipDataset.from_manifest(data / "disfa_test1.sample.jsonl", "disfa", tmp_path, num_frames=4,
                                     eval_cover=True)
    assert len(ds) == 9 and [len(r) for r in ds.runs] == [4, 5]  # frames 783-786 and 2000-2004


# ---------------------------------------------------------------------------------------------
# fast decoding path (default) vs the float reference path (fast_decode=False)


def _jpeg_clip_folder(root: Path, name: str, n: int, size=(40, 48)) -> None:
    g = torch.Generator().manual_seed(n)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=size, mode="bicubic",
                                           align_corners=False)
    for i in range(n):
        img = ((base[0] * 0.8 + 0.02 * i).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name / f"{i}.jpg", quality=90)


def test_expression_fast_decode_matches_reference(tmp_path):
    from facelayers.data.transforms import CLIP_STD, FAST_PATH_ATOL, train_transform

    _jpeg_clip_folder(tmp_path, "a", 11)
    rec = [ExpressionRecord("a", 11, 2)]
    # no transform: bit-identical
    fast = ExpressionClipDataset(rec, tmp_path, num_frames=4, train=True, seed=3)
    ref = ExpressionClipDataset(rec, tmp_path, num_frames=4, train=True, seed=3, fast_decode=False)
    assert torch.equal(fast[0]["clip"], ref[0]["clip"])
    # train preset, same seed: same draws, rounding-level differences (brightness <= 1.5)
    kw = dict(num_frames=16, train=True, seed=5, transform=train_transform(24, erase_p=1.0), draft=False)
    a = ExpressionClipDataset(rec, tmp_path, **kw)[0]["clip"]
    b = ExpressionClipDataset(rec, tmp_path, fast_decode=False, **kw)[0]["clip"]
    assert a.shape == b.shape == (16, 3, 24, 24)
    torch.testing.assert_close(a, b, atol=FAST_PATH_ATOL * 1.5 / min(CLIP_STD) + 1e-5, rtol=0)
    # a plain callable gets the same float clip as in the reference path
    seen = []
    ExpressionClipDataset(rec, tmp_path, num_frames=4, transform=lambda c: seen.append(c) or c)[0]
    ExpressionClipDataset(rec, tmp_path, num_frames=4, transform=lambda c: seen.append(c) or c, fast_decode=False)[0]
    assert torch.equal(seen[0], seen[1])
    assert "fast_decode=True" in repr(fast)


def test_au_fast_decode_matches_reference_and_reports_size_mismatch(tmp_path):
    from facelayers.data.transforms import CLIP_STD, FAST_PATH_ATOL, eval_transform

    _jpeg_clip_folder(tmp_path, "S", 6)
    recs = [AURecord(f"S/{f}.jpg", "S", f, (f & 1, 0)) for f in range(6)]
    kw = dict(num_frames=4, transform=eval_transform(20), draft=False)
    a = AUClipDataset(recs, tmp_path, **kw)[0]
    b = AUClipDataset(recs, tmp_path, fast_decode=False, **kw)[0]
    torch.testing.assert_close(a["clip"], b["clip"], atol=FAST_PATH_ATOL / min(CLIP_STD) + 1e-5, rtol=0)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["mask"], b["mask"])
    Image.new("RGB", (9, 9)).save(tmp_path / "S" / "2.jpg")
    with pytest.raises(ValueError, match="sequence 'S'.*different sizes"):
        AUClipDataset(recs, tmp_path, num_frames=4)[0]


def test_expression_video_fast_decode_matches_reference(tmp_path):
    _write_mp4(tmp_path / "clip.mp4", [(8 * i, 4 * i, 255 - 8 * i) for i in range(30)], gop_size=5)
    rec = [ExpressionRecord("clip.mp4", 30, 1)]
    for train in (False, True):
        fast = ExpressionClipDataset(rec, tmp_path, num_frames=6, train=train, seed=2)
        ref = ExpressionClipDataset(rec, tmp_path, num_frames=6, train=train, seed=2, fast_decode=False)
        assert fast.sample_indices(0) == ref.sample_indices(0) or train
        assert torch.equal(fast[0]["clip"], ref[0]["clip"])
