"""predict_video.py on raw videos: the face stage (detection, tracking, alignment) wired in front
of the model (issue 17).

A 35-frame video is synthesised from matplotlib's ``grace_hopper.jpg`` (tests/_faces_video.py:
the face moving, scaled and rotated over 30 frames, 5 frames of noise at 15..19), written as an
MPEG-4 file with PyAV and run end to end with the real MTCNN detector (``faces`` extra) through
a converted released checkpoint (the tiny fixture tests/data/ssm_release/bp4d_dfew_tiny.pth,
converted here) and a tiny facelayers model. Everything is offline.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
import torch
from _faces_video import NOISE_AT, N_NOISE, make_synthetic_video, write_mp4
from _testutils import load_example

from facelayers import facs
from facelayers.faces import FACE_COLUMNS, NoFaceError, nearest_present
from facelayers.models import ssm
from facelayers.models.ssm import inference as I

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "ssm_release" / "bp4d_dfew_tiny.pth"
P = load_example("predict_video")
NOISE = list(range(NOISE_AT, NOISE_AT + N_NOISE))


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "expected" in lines[0] and "got" in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    pytest.importorskip("av")
    frames, face_idx, _ = make_synthetic_video()
    assert [f for f in range(frames.shape[0]) if f not in face_idx] == NOISE
    path = write_mp4(frames, tmp_path_factory.mktemp("video") / "hopper.mp4", fps=10)
    return frames, path


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """The tiny released fixture, converted with the converter script (as a user would)."""
    out = tmp_path_factory.mktemp("released")
    convert = load_example("convert_ssm_release")
    assert convert.main([str(FIXTURE), "--au-dataset", "bp4d", "--exp-dataset", "dfew", "--out", str(out), "--force"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny facelayers model (both tasks, 4 frames, 32-px input) saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny") / "checkpoint"
    torch.manual_seed(0)
    cfg = ssm.ModelConfig(mode="ssm", num_frames=4, image_size=32, moe_blocks="all", temporal_heads=2,
                          clip_kwargs=ssm.tiny_clip_kwargs(32, 16, 32, 1))
    ssm.save_model(ssm.build_model(cfg), str(folder), name="best")
    return folder


def _check_face_outputs(out: Path, n: int, aus: list[str], expressions: list[str]) -> None:
    """One row per input frame everywhere, face columns consistent, empty cells where face = 0."""
    au_cols, au_rows = _read(out / "au_probs.csv")
    face_cols, face_rows = _read(out / "faces.csv")
    assert au_cols == ["frame", "time_s", *FACE_COLUMNS, *aus]
    assert len(au_rows) == len(face_rows) == n
    assert [int(r["frame"]) for r in au_rows] == list(range(n))  # nothing dropped or shifted
    assert [int(r["face"]) for r in au_rows] == [0 if f in NOISE else 1 for f in range(n)]
    for a, f in zip(au_rows, face_rows):
        assert {c: a[c] for c in FACE_COLUMNS} == {c: f[c] for c in FACE_COLUMNS}
        values = [a[c] for c in aus] + [a[c] for c in FACE_COLUMNS[1:]]
        if a["face"] == "0":
            assert all(v == "" for v in values), a
        else:
            assert all(v != "" for v in values), a
            assert all(0.0 <= float(a[c]) <= 1.0 for c in aus)
            x1, y1, x2, y2 = (float(a[c]) for c in ("face_x1", "face_y1", "face_x2", "face_y2"))
            assert 0 <= x1 < x2 <= 192 and 0 <= y1 < y2 <= 192
    exp_cols, exp_rows = _read(out / "expression_probs.csv")
    assert exp_cols == ["start", "end", "start_s", "end_s", "face_frames", *expressions, "top"]
    assert exp_rows and int(exp_rows[-1]["end"]) == n
    for r in exp_rows:
        assert 1 <= int(r["face_frames"]) and r["top"] in expressions  # every window here sees the face
        assert abs(sum(float(r[e]) for e in expressions) - 1.0) < 1e-3
    assert (out / "face_crops.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------- end to end


def test_converted_release_checkpoint_on_raw_video(video, released, tmp_path, capsys):
    """ACCEPTANCE: a converted released checkpoint on the synthesised mp4: one row per input frame
    with face columns, in under a minute (face detection is on by default for a raw video)."""
    frames, path = video
    model = ssm.load_model(released)
    out = tmp_path / "pred"
    t0 = time.perf_counter()
    rc = P.main([str(released), str(path), "--out", str(out)])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    print(f"predict_video (converted tiny release fixture, 35-frame 192x192 mp4, with plot): {seconds:.1f} s",
          file=sys.__stderr__)
    assert seconds < 60.0, f"predict_video took {seconds:.1f} s (expected < 60 s)"
    aus = [facs.au_label(a) for a in model.release.aus]
    _check_face_outputs(out, frames.shape[0], aus, list(model.release.expressions))
    assert (out / "au_timeline.png").is_file()
    assert "face 0 found in 30 of 35 frames" in captured.err


def test_tiny_model_on_frame_folder_all_faces(video, tiny, tmp_path, monkeypatch):
    """A folder of frames, ``--all-faces``: one output folder per track, the same row layout; the
    model is given the aligned crops at its input size."""
    from PIL import Image

    calls = []
    stage = P.face_stage.detect_align_track

    def recording(frames, **kw):
        tracks = stage(frames, **kw)
        calls.append((kw, tracks))
        return tracks

    monkeypatch.setattr(P.face_stage, "detect_align_track", recording)

    frames, _ = video
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f.numpy()).save(folder / f"{i:04d}.png")
    out = tmp_path / "pred"
    assert P.main([str(tiny), str(folder), "--out", str(out), "--all-faces", "--no-plot", "--batch", "8"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["face0"]  # one face in this video
    cfg = ssm.load_model(str(tiny), "best").cfg
    _check_face_outputs(out / "face0", frames.shape[0], [facs.au_label(a) for a in cfg.aus], list(cfg.expressions))
    _, rows = _read(out / "face0" / "au_probs.csv")
    assert rows[0]["time_s"] == ""  # a frame folder has no frame rate
    ((kw, tracks),) = calls
    assert kw["size"] == cfg.image_size == 32 and kw["all_faces"] and kw["margin"] == 0.25
    assert tracks[0].crops.shape == (frames.shape[0], 3, 32, 32)


def test_video_without_any_face_is_an_error(tiny, tmp_path, capsys):
    pytest.importorskip("av")
    g = torch.Generator().manual_seed(3)
    noise = (torch.rand(6, 96, 96, 3, generator=g) * 255).to(torch.uint8)
    path = write_mp4(noise, tmp_path / "noise.mp4")
    rc = P.main([str(tiny), str(path), "--out", str(tmp_path / "o")])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "noise.mp4" in line and "no face found" in line and "got none in 6 frames" in line
    assert "--no-detect-faces" in line  # automatic mode says how to run on the frames as they are
    assert not (tmp_path / "o" / "au_probs.csv").exists()
    rc = P.main([str(tiny), str(path), "--out", str(tmp_path / "o"), "--detect-faces"])
    assert rc == 2 and "no face found" in _one_error_line(capsys.readouterr().err)


def test_no_detect_faces_keeps_the_frames_as_given(video, tiny, tmp_path, capsys):
    """``--no-detect-faces``: today's outputs (no face columns), equal to the library on the raw frames."""
    frames, path = video
    out = tmp_path / "pred"
    assert P.main([str(tiny), str(path), "--out", str(out), "--no-detect-faces", "--no-plot"]) == 0
    assert "note:" not in capsys.readouterr().err
    cols, rows = _read(out / "au_probs.csv")
    model = ssm.load_model(str(tiny), "best")
    assert cols == ["frame", "time_s", *[facs.au_label(a) for a in model.cfg.aus]]
    assert not (out / "faces.csv").exists() and not (out / "face_crops.png").exists()
    decoded, _ = I.read_frames(path)
    ref = I.predict_video(model, decoded)
    got = torch.tensor([[float(r[c]) for c in cols[2:]] for r in rows])
    assert len(rows) == frames.shape[0]
    torch.testing.assert_close(got, ref["au_probs"], atol=1e-5, rtol=0)
    exp_cols, _ = _read(out / "expression_probs.csv")
    assert "face_frames" not in exp_cols


def test_automatic_mode_leaves_face_crops_alone(tiny, tmp_path, capsys):
    """Frames no larger than the model's input are taken as crops: no detector, a note, today's CSV."""
    from PIL import Image

    folder = tmp_path / "crops"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 120)).save(folder / f"{i}.png")
    assert P.main([str(tiny), str(folder), "--out", str(tmp_path / "o"), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "face detection off" in err and "no larger than the model's input (32)" in err
    cols, rows = _read(tmp_path / "o" / "au_probs.csv")
    assert "face" not in cols and len(rows) == 3


def test_automatic_mode_recognises_a_face_crop_video(tiny, tmp_path, capsys):
    """Frames larger than the model's input in which the face fills the frame: a crop, detection off."""
    from _faces_video import grace_hopper

    pytest.importorskip("facenet_pytorch")
    face = grace_hopper().crop((150, 100, 380, 360))  # the face box is about (174, 120, 356, 340)
    folder = tmp_path / "crops"
    folder.mkdir()
    for i in range(3):
        face.resize((96 + 4 * i, 96 + 4 * i)).resize((96, 96)).save(folder / f"{i}.png")
    assert P.main([str(tiny), str(folder), "--out", str(tmp_path / "o"), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "face detection off" in err and "looks like a face crop" in err
    cols, rows = _read(tmp_path / "o" / "au_probs.csv")
    assert "face" not in cols and len(rows) == 3


def test_detect_faces_without_the_extra(tiny, tmp_path, capsys, monkeypatch):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (10, 20 * i, 30)).save(folder / f"{i}.png")
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import facenet_pytorch -> ImportError
    rc = P.main([str(tiny), str(folder), "--out", str(tmp_path / "o"), "--detect-faces"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert 'pip install "facelayers[faces]"' in line
    # automatic mode: off, with a note naming the install command; the run goes on
    assert P.main([str(tiny), str(folder), "--out", str(tmp_path / "o"), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "face detection off" in err and 'pip install "facelayers[faces]"' in err
    assert len(_read(tmp_path / "o" / "au_probs.csv")[1]) == 2


@pytest.mark.parametrize("flags", [["--no-detect-faces", "--all-faces"], ["--no-detect-faces", "--face-margin", "0.1"]])
def test_contradictory_face_options(flags, tiny, tmp_path, capsys):
    (tmp_path / "f").mkdir()
    rc = P.main([str(tiny), str(tmp_path / "f"), "--out", str(tmp_path / "o"), *flags])
    assert rc == 2
    assert flags[1] in _one_error_line(capsys.readouterr().err)


def test_face_margin_must_be_nonnegative(tiny, tmp_path, capsys):
    (tmp_path / "f").mkdir()
    rc = P.main([str(tiny), str(tmp_path / "f"), "--out", str(tmp_path / "o"), "--face-margin", "-0.5"])
    assert rc == 2 and "--face-margin" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------- library


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    cfg = ssm.ModelConfig(mode="ssm", num_frames=4, image_size=16, moe_blocks="all", temporal_heads=2,
                          clip_kwargs=ssm.tiny_clip_kwargs(16, 8, 32, 1))
    return ssm.build_model(cfg).eval()


@pytest.mark.parametrize("pattern", ["FFTTFTTTFFTF", "TFFFFFFFFFFF", "TTTTTTTTTTTT", "FFFFFFFFFFFT"])
def test_present_mask_equals_running_on_the_nearest_face_frames(tiny_model, pattern):
    """The fast path (encode only frames with a face, gather features) = the model on the video in
    which every frame without a face is replaced by its nearest frame with one; outputs of frames
    without a face are NaN; no window ever sees an absent (empty) frame."""
    present = torch.tensor([c == "T" for c in pattern])
    n = present.numel()
    g = torch.Generator().manual_seed(7)
    frames = torch.rand(n, 3, 16, 16, generator=g)
    frames[~present] = 0.0  # empty crops, as the face stage leaves them
    seen: list[torch.Tensor] = []
    encode = tiny_model.encode_task_frames

    def spy(x, task):
        seen.append(x)
        return encode(x, task)

    tiny_model.encode_task_frames = spy
    try:
        res = I.predict_video(tiny_model, frames, window=6, stride=2, batch=5, present=present)
    finally:
        del tiny_model.encode_task_frames
    assert sum(x.shape[0] for x in seen) == 2 * int(present.sum())  # each face frame once per task
    gathered = frames[nearest_present(present)]
    assert not (gathered.flatten(1) == 0).all(1).any()  # the reference never holds an empty crop
    ref = I.predict_video(tiny_model, gathered, window=6, stride=2, batch=5)
    au = res["au_probs"]
    assert au.shape == ref["au_probs"].shape == (n, len(tiny_model.cfg.aus))
    assert torch.isnan(au[~present]).all() and not torch.isnan(au[present]).any()
    torch.testing.assert_close(au[present], ref["au_probs"][present], atol=1e-5, rtol=1e-4)
    wins = I.expression_windows(n, 4, 6, 2)
    counts = torch.tensor([int(present[w[2]].sum()) for w in wins])
    assert res["exp_windows"] == ref["exp_windows"] == [(w[0], w[1]) for w in wins]
    assert torch.equal(res["exp_face_frames"], counts)
    blank = counts == 0
    assert torch.isnan(res["exp_probs"][blank]).all() and not torch.isnan(res["exp_probs"][~blank]).any()
    torch.testing.assert_close(res["exp_probs"][~blank], ref["exp_probs"][~blank], atol=1e-5, rtol=1e-4)


def test_present_mask_bad_input(tiny_model):
    frames = torch.rand(5, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected torch.bool \(5,\), got torch.int64 \(5,\)"):
        I.predict_video(tiny_model, frames, present=torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected torch.bool \(5,\), got torch.bool \(4,\)"):
        I.predict_video(tiny_model, frames, present=torch.ones(4, dtype=torch.bool))
    with pytest.raises(NoFaceError, match="got none in 5 frames"):
        I.predict_video(tiny_model, frames, present=torch.zeros(5, dtype=torch.bool))


@pytest.mark.requires_cuda
def test_raw_video_on_cuda(video, released, tmp_path):
    """Detection, alignment and the model on CUDA give the CPU's rows (same faces, close values)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, path = video
    for dev in ("cpu", "cuda"):
        assert P.main([str(released), str(path), "--out", str(tmp_path / dev), "--no-plot", "--device", dev]) == 0
    _, cpu = _read(tmp_path / "cpu" / "au_probs.csv")
    _, gpu = _read(tmp_path / "cuda" / "au_probs.csv")
    assert [r["face"] for r in cpu] == [r["face"] for r in gpu]
    for a, b in zip(cpu, gpu):
        if a["face"] == "1":
            assert abs(float(a["AU01"]) - float(b["AU01"])) < 0.05
