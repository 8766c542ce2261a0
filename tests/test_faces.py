"""Face stage: alignment (Umeyama, template, warp), tracking, the pipeline on a synthetic video.

The end-to-end tests synthesise a short video from matplotlib's sample photo ``grace_hopper.jpg``
(shifted, scaled and rotated over 30 frames, with 5 noise frames in the middle; the helper is in
tests/_faces_video.py, shared with tests/test_predict_faces.py) with Pillow's affine transform
(independent of :func:`warp_faces`) and run the real MTCNN detector of the ``faces`` extra on it,
offline.
"""

from __future__ import annotations

import ast
import csv
import itertools
import math
import pathlib
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _faces_video import make_synthetic_video, pil_affine, similarity

from facelayers.faces import (
    FACE_COLUMNS,
    Detections,
    FacesExtraMissingError,
    MTCNNDetector,
    NoFaceError,
    apply_affine,
    contact_sheet,
    detect_align_track,
    face_template,
    invert_affine,
    link_detections,
    looks_like_face_crop,
    nearest_present,
    smooth_over_time,
    umeyama,
    warp_faces,
    write_face_csv,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- helpers


def complex_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Independent 2-D reference: least squares of ``z -> a z + b`` over complex numbers."""
    zs = torch.complex(src[..., 0].double(), src[..., 1].double())
    zd = torch.complex(dst[..., 0].double(), dst[..., 1].double()).expand_as(zs)
    zs_c = zs - zs.mean(-1, keepdim=True)
    zd_c = zd - zd.mean(-1, keepdim=True)
    a = (zs_c.conj() * zd_c).sum(-1) / (zs_c.abs() ** 2).sum(-1)
    b = zd.mean(-1) - a * zs.mean(-1)
    row0 = torch.stack([a.real, -a.imag, b.real], -1)
    row1 = torch.stack([a.imag, a.real, b.imag], -1)
    return torch.stack([row0, row1], -2)


def box_detection(boxes: list[list[float]], score: float = 0.99) -> Detections:
    """A frame's detections with landmarks placed at the template positions inside each box."""
    if not boxes:
        return Detections.empty()
    b = torch.tensor(boxes, dtype=torch.float32)
    unit = (face_template(100, 0.0) + 0.5) / 100  # [5, 2] in [0, 1]
    lms = b[:, None, :2] + unit[None] * (b[:, None, 2:] - b[:, None, :2])
    return Detections(b, torch.full((len(boxes),), score), lms)


class ScriptedDetector:
    """Returns prescribed detections frame by frame and records what it was given."""

    def __init__(self, per_frame: list[list[list[float]]]):
        self.per_frame = per_frame
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> list[Detections]:
        self.seen.append(images.detach().cpu())
        out = [box_detection(self.per_frame[self.calls + i]) for i in range(images.shape[0])]
        self.calls += images.shape[0]
        return out


# ----------------------------------------------------------------------------------- alignment


def test_template_default_and_margin():
    t0 = face_template(112, 0.0, dtype=torch.float64)
    assert torch.allclose(t0[0], torch.tensor([38.2946, 51.6963], dtype=torch.float64))
    t = face_template(224, 0.25, dtype=torch.float64)
    centre = torch.tensor([111.5, 111.5], dtype=torch.float64)
    # margin zooms out about the crop centre: distances from it shrink by 1 + margin
    assert torch.allclose((t - centre), (face_template(224, 0.0, dtype=torch.float64) - centre) / 1.25)
    with pytest.raises(ValueError, match=r"expected e\.g\. 224, got 0"):
        face_template(0)
    with pytest.raises(ValueError, match="margin"):
        face_template(112, -1.0)


@given(
    scale=st.floats(0.2, 5.0),
    degrees=st.floats(-179.0, 179.0),
    tx=st.floats(-300, 300),
    ty=st.floats(-300, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_umeyama_recovers_a_known_similarity(scale, degrees, tx, ty, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(5, 2, generator=g, dtype=torch.float64) * 200
    m = similarity(scale, degrees, tx, ty)
    dst = apply_affine(m, src)
    est = umeyama(src, dst)
    assert torch.allclose(est, m, atol=1e-8, rtol=1e-8), f"recovered {est} for {m}"


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), points=st.integers(2, 7))
def test_umeyama_matches_complex_least_squares_on_noisy_points(seed, batch, points):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(batch, points, 2, generator=g, dtype=torch.float64) * 50
    dst = torch.randn(points, 2, generator=g, dtype=torch.float64) * 30 + 100
    est = umeyama(src, dst)
    ref = complex_similarity(src, dst)
    assert est.shape == (batch, 2, 3)
    assert torch.allclose(est, ref, atol=1e-9), f"max |diff| {(est - ref).abs().max():.3g}"
    # a similarity without reflection: A = s R with det R = +1
    a = est[..., :2]
    assert torch.all(torch.linalg.det(a) > 0)
    assert torch.allclose(a[..., 0, 0], a[..., 1, 1]) and torch.allclose(a[..., 0, 1], -a[..., 1, 0])


def test_umeyama_never_reflects_mirrored_points():
    dst = face_template(112, dtype=torch.float64)
    src = dst.clone()
    src[:, 0] = 111 - src[:, 0]  # a mirror image (left/right swapped)
    a = umeyama(src, dst)[:, :2]
    assert torch.linalg.det(a) > 0


def test_umeyama_bad_shapes():
    with pytest.raises(ValueError, match=r"expected \[\.\.\., P, D\] points with P >= 2"):
        umeyama(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"dst: expected the points' shape"):
        umeyama(torch.zeros(5, 2), torch.zeros(4, 2))


def test_invert_affine_round_trip():
    m = similarity(1.7, 33.0, 4.0, -9.0)
    pts = torch.randn(7, 2, dtype=torch.float64)
    assert torch.allclose(apply_affine(invert_affine(m), apply_affine(m, pts)), pts, atol=1e-12)


def test_warp_integer_translation_is_a_slice():
    frames = torch.rand(2, 3, 40, 50)
    m = torch.tensor([[[1.0, 0, -7], [0, 1, -3]], [[1.0, 0, -20], [0, 1, -11]]])
    out = warp_faces(frames, m, 16)
    assert torch.allclose(out[0], frames[0, :, 3:19, 7:23], atol=1e-5)
    assert torch.allclose(out[1], frames[1, :, 11:27, 20:36], atol=1e-5)


def test_warp_matches_pillow_affine():
    """Same pixel convention as Pillow's (independent) affine transform."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    img = (torch.rand(60, 80, 3, generator=g) * 255).round().to(torch.uint8)
    m = similarity(1.3, 17.0, -12.0, 5.0)
    ours = warp_faces(img.permute(2, 0, 1)[None].float() / 255, m[None].float(), 48)[0]
    ref = pil_affine(Image.fromarray(img.numpy()), m, (48, 48))
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    # compare where the whole bilinear footprint is inside the source
    inside = torch.zeros(48, 48, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    src = apply_affine(invert_affine(m).float(), torch.stack([xs, ys], -1).reshape(-1, 2)).reshape(48, 48, 2)
    inside = (src[..., 0] > 0.5) & (src[..., 0] < 78.5) & (src[..., 1] > 0.5) & (src[..., 1] < 58.5)
    assert inside.sum() > 500
    diff = (ours - ref).abs()[:, inside]
    assert diff.max() <= 2.5 / 255, f"max |ours - pillow| = {diff.max() * 255:.2f} / 255"


def test_warp_antialias_removes_aliasing():
    """A 1-pixel checkerboard shrunk 4x is flat grey with antialiasing, aliased without."""
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    board = ((yy + xx) % 2).float().expand(1, 3, 256, 256).contiguous()
    m = similarity(0.25, 0.0, 0.0, 0.0, dtype=torch.float32)[None]
    smooth = warp_faces(board, m, 64)
    aliased = warp_faces(board, m, 64, antialias=False)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # border pixels reach outside
    assert (smooth[inner] - 0.5).abs().max() < 0.05
    assert (aliased[inner] - 0.5).abs().max() > 0.2


def test_warp_bad_input():
    with pytest.raises(ValueError, match=r"expected a floating \[B, C, H, W\] tensor"):
        warp_faces(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 2, 3), 4)
    with pytest.raises(ValueError, match=r"matrix: expected \[B, 2, 3\]"):
        warp_faces(torch.zeros(2, 3, 8, 8), torch.zeros(1, 2, 3), 4)


# ----------------------------------------------------------------------------------- tracking


def test_smooth_over_time_stays_within_runs():
    v = torch.tensor([0.0, 0.0, 0.0, 100.0, 100.0, 50.0, 7.0]).unsqueeze(1)
    present = torch.tensor([True, True, True, False, True, True, False])
    out = smooth_over_time(v, present, sigma=2.0)
    assert torch.allclose(out[:3], torch.zeros(3, 1))  # the first run is constant: unchanged
    assert out[3] == 100.0 and out[6] == 7.0  # absent frames untouched
    assert 50.0 < out[4, 0] < 100.0 and 50.0 < out[5, 0] < 100.0  # only averaged with each other
    assert torch.equal(smooth_over_time(v, present, 0.0), v)


@given(
    mask=st.lists(st.booleans(), min_size=1, max_size=30),
    sigma=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_smooth_over_time_properties(mask, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(mask)
    present = torch.tensor(mask)
    v = torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    v[~present] = float("nan")
    out = smooth_over_time(v, present, sigma)
    assert out.shape == v.shape
    assert torch.isnan(out[~present]).all() and torch.isfinite(out[present]).all()
    # each present value is a convex combination of its own run's values
    f = 0
    for is_present, group in itertools.groupby(mask):
        e = f + len(list(group))
        if is_present:
            run, sm = v[f:e], out[f:e]
            assert torch.all(sm >= run.amin(0) - 1e-9) and torch.all(sm <= run.amax(0) + 1e-9)
        f = e
    # a linear trend is kept exactly inside runs (symmetric kernel), away from run ends
    lin = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    out_lin = smooth_over_time(lin, torch.ones(n, dtype=torch.bool), sigma)
    r = max(1, math.ceil(3 * sigma))
    if n > 2 * r:
        assert torch.allclose(out_lin[r:-r], lin[r:-r])


def test_smooth_over_time_bad_mask():
    with pytest.raises(ValueError, match=r"present: expected a \[N\] = \[3\] bool tensor"):
        smooth_over_time(torch.zeros(3), torch.ones(4, dtype=torch.bool), 1.0)


def test_link_detections_follows_overlap_and_splits_on_jumps():
    a = [10.0, 10.0, 50.0, 50.0]
    b = [100.0, 100.0, 130.0, 130.0]
    dets = [
        box_detection([a, b]),
        box_detection([[b[0] + 2, b[1], b[2] + 2, b[3]], [a[0] + 3, a[1] + 1, a[2] + 3, a[3] + 1]]),  # order swapped
        box_detection([]),
        box_detection([[a[0] + 4, a[1], a[2] + 4, a[3]]]),
        box_detection([[200.0, 10.0, 240.0, 50.0]]),  # no overlap with anything: a new track
    ]
    tracks = link_detections(dets)
    assert [t.tolist() for t in tracks] == [[0, 1, -1, 0, -1], [1, 0, -1, -1, -1], [-1, -1, -1, -1, 0]]
    # a track closes after max_gap frames without a detection
    tracks = link_detections(dets, max_gap=0)
    assert [t.tolist() for t in tracks][:2] == [[0, 1, -1, -1, -1], [1, 0, -1, -1, -1]]
    assert tracks[2].tolist() == [-1, -1, -1, 0, -1]
    with pytest.raises(ValueError, match=r"iou_threshold: expected a value in \(0, 1\]"):
        link_detections(dets, iou_threshold=0.0)


def _two_face_video(n: int = 8):
    """A large central face and a small corner face; the corner face misses frames 2-3."""
    big = [[60.0 + f, 50.0, 140.0 + f, 150.0] for f in range(n)]
    small = [[5.0, 5.0 + f, 35.0, 40.0 + f] for f in range(n)]
    per_frame = [[small[f], big[f]] if f not in (2, 3) else [big[f]] for f in range(n)]
    frames = torch.zeros(n, 200, 200, 3, dtype=torch.uint8)
    return frames, per_frame, big, small


def test_main_face_is_the_prominent_one_and_all_faces_gives_one_track_each():
    frames, per_frame, big, small = _two_face_video()
    (main,) = detect_align_track(frames, size=32, detector=ScriptedDetector(per_frame), smooth_sigma=0.0)
    assert main.present.all()
    assert torch.allclose(main.boxes, torch.tensor(big))
    tracks = detect_align_track(frames, size=32, all_faces=True, detector=ScriptedDetector(per_frame), smooth_sigma=0.0)
    assert [t.track_id for t in tracks] == [0, 1]
    assert tracks[0].prominence > tracks[1].prominence
    second = tracks[1]
    assert second.present.tolist() == [True, True, False, False, True, True, True, True]
    assert torch.isnan(second.boxes[2:4]).all() and torch.isnan(second.landmarks[2:4]).all()
    assert torch.isnan(second.matrices[2:4]).all() and (second.crops[2:4] == 0).all()
    assert torch.allclose(second.boxes[second.present], torch.tensor(small)[second.present])


def test_pipeline_accepts_float_chw_frames_like_uint8_hwc():
    frames, per_frame, _, _ = _two_face_video(4)
    frames = (torch.rand(4, 200, 200, 3) * 255).round().to(torch.uint8)
    det_u8, det_f = ScriptedDetector(per_frame), ScriptedDetector(per_frame)
    (a,) = detect_align_track(frames, size=24, detector=det_u8, batch_size=3)
    (b,) = detect_align_track(frames.permute(0, 3, 1, 2).float() / 255, size=24, detector=det_f, batch_size=3)
    assert [s.shape[0] for s in det_u8.seen] == [3, 1]  # batched
    assert torch.allclose(torch.cat(det_u8.seen).float(), torch.cat(det_f.seen), atol=1e-3)
    assert torch.allclose(a.crops, b.crops, atol=1e-5)
    assert torch.equal(a.present, b.present)


def test_pipeline_bad_input():
    with pytest.raises(ValueError, match=r"expected float values in \[0, 1\], got the range"):
        detect_align_track(torch.full((2, 3, 8, 8), 255.0), detector=ScriptedDetector([[], []]))
    with pytest.raises(ValueError, match=r"expected uint8 \[N, H, W, 3\] RGB, got shape \(2, 3, 8, 8\)"):
        detect_align_track(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), detector=ScriptedDetector([[], []]))
    with pytest.raises(ValueError, match="expected at least one frame, got 0"):
        detect_align_track(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), detector=ScriptedDetector([]))


def test_no_face_anywhere_is_an_error():
    frames = torch.zeros(6, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(NoFaceError, match=r"expected at least one frame with a face, got none in 6 frames"):
        detect_align_track(frames, detector=ScriptedDetector([[]] * 6))
    assert issubclass(NoFaceError, ValueError)


def test_nearest_present():
    present = torch.tensor([False, True, False, False, False, True, False])
    assert nearest_present(present).tolist() == [1, 1, 1, 1, 5, 5, 5]
    with pytest.raises(NoFaceError, match="got none in 3 frames"):
        nearest_present(torch.zeros(3, dtype=torch.bool))


def test_rows_and_csv_keep_every_frame(tmp_path):
    frames, per_frame, _, _ = _two_face_video()
    tracks = detect_align_track(frames, size=32, all_faces=True, detector=ScriptedDetector(per_frame))
    second = tracks[1]
    rows = second.rows()
    assert len(rows) == 8 and list(rows[0]) == list(FACE_COLUMNS)
    assert len(FACE_COLUMNS) == 1 + 1 + 4 + 10
    assert [r["face"] for r in rows] == [1, 1, 0, 0, 1, 1, 1, 1]
    assert all(rows[2][c] == "" for c in FACE_COLUMNS[1:])
    path = write_face_csv(tmp_path / "faces.csv", second, fps=25.0)
    with open(path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["frame"]) for r in table] == list(range(8))
    assert table[3]["time_s"] == "0.1200" and table[3]["face"] == "0" and table[3]["left_eye_x"] == ""
    assert float(table[4]["face_x1"]) == pytest.approx(float(second.boxes[4, 0]), abs=0.01)


def test_contact_sheet_shows_absent_frames():
    frames, per_frame, _, _ = _two_face_video()
    second = detect_align_track(frames, size=32, all_faces=True, detector=ScriptedDetector(per_frame))[1]
    sheet = contact_sheet(second, columns=4, tile=32)
    assert sheet.size == (4 * 32, 2 * (32 + 14))
    grey = np.asarray(sheet)[0 * 46 + 16, 2 * 32 + 2]  # frame 2's tile (absent) is grey
    assert tuple(grey) == (90, 90, 90)


# ----------------------------------------------------------------------------------- the extra


def test_facenet_is_not_imported_at_module_level():
    """``import facelayers`` (any module) must work without the faces extra."""
    for path in (REPO / "facelayers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "facenet_pytorch" for n in names), f"{path} imports facenet_pytorch"


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes `import facenet_pytorch` fail
    with pytest.raises(FacesExtraMissingError, match=r'pip install "facelayers\[faces\]"') as info:
        MTCNNDetector()
    assert isinstance(info.value, ImportError)
    with pytest.raises(FacesExtraMissingError):
        detect_align_track(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------------- end to end (MTCNN)

SIZE = 112


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("facenet_pytorch")
    return MTCNNDetector()


@pytest.fixture(scope="module")
def synthetic_video(detector):
    return make_synthetic_video(detector)


@pytest.fixture(scope="module")
def synthetic_track(synthetic_video, detector):
    frames, _, _ = synthetic_video
    tracks = detect_align_track(frames, size=SIZE, all_faces=True, detector=detector, batch_size=16)
    return tracks


def test_synthetic_video_face_found_in_every_face_frame(synthetic_video, synthetic_track):
    frames, face_idx, _ = synthetic_video
    assert len(synthetic_track) == 1, f"expected one face track, got {synthetic_track}"
    (track,) = synthetic_track
    n = frames.shape[0]
    noise_idx = [f for f in range(n) if f not in face_idx]
    assert track.present[face_idx].all(), f"missed faces at {(~track.present).nonzero().flatten().tolist()}"
    assert not track.present[noise_idx].any()
    assert track.crops.shape == (n, 3, SIZE, SIZE) and track.boxes.shape == (n, 4)
    assert track.landmarks.shape == (n, 5, 2) and track.matrices.shape == (n, 2, 3)
    assert (track.crops[noise_idx] == 0).all() and torch.isnan(track.boxes[noise_idx]).all()
    assert (track.crops[face_idx].flatten(1).std(1) > 0.05).all()  # real image content
    rows = track.rows()
    assert len(rows) == n and [r["face"] for r in rows] == track.present.int().tolist()


def test_synthetic_video_aligned_eyes_land_on_the_template(synthetic_video, synthetic_track):
    _, face_idx, truth = synthetic_video
    (track,) = synthetic_track
    in_crop = apply_affine(track.matrices[face_idx].double(), truth)  # true landmarks, crop pixels
    err = (in_crop - track.template().double()).norm(dim=-1)  # [30, 5]
    assert err[:, :2].max() < 4.0, f"eye error (px in a {SIZE}-px crop): max {err[:, :2].max():.2f}"
    assert err.max() < 6.0, f"landmark error: max {err.max():.2f}"
    # against the best possible alignment (Umeyama on the true landmarks), which leaves only the
    # face-shape residual: what remains is detection noise and smoothing
    ideal = apply_affine(umeyama(truth, track.template().double()), truth)
    dev = (in_crop - ideal).norm(dim=-1)
    assert dev.max() < 3.0 and dev.mean() < 1.5, f"vs ideal alignment: max {dev.max():.2f}, mean {dev.mean():.2f}"


def test_synthetic_video_crop_rule(synthetic_video, synthetic_track, detector):
    frames, face_idx, _ = synthetic_video
    (track,) = synthetic_track
    assert not looks_like_face_crop(frames, detector=detector)
    crops = (track.crops[face_idx[::6]] * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert looks_like_face_crop(crops, detector=detector)


def test_noise_video_raises_no_face_error(detector):
    g = torch.Generator().manual_seed(1)
    frames = (torch.rand(4, 96, 96, 3, generator=g) * 255).to(torch.uint8)
    with pytest.raises(NoFaceError, match=r"expected at least one frame with a face, got none in 4 frames"):
        detect_align_track(frames, detector=detector)


@pytest.mark.requires_cuda
def test_synthetic_video_on_cuda_matches_cpu(synthetic_video, synthetic_track):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    frames, face_idx, _ = synthetic_video
    (cpu,) = synthetic_track
    (gpu,) = detect_align_track(frames.cuda(), size=SIZE, device="cuda", batch_size=16)
    assert torch.equal(gpu.present, cpu.present)
    assert (gpu.landmarks[face_idx] - cpu.landmarks[face_idx]).abs().max() < 1.0
    assert (gpu.crops - cpu.crops).abs().mean() < 0.02
