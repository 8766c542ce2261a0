"""From raw frames to aligned face crops: detection, tracking, alignment, per-frame face records.

:func:`detect_align_track` runs a face detector (MTCNN by default) over a video in batches, links
the detections into tracks (:mod:`.track`), smooths each track's boxes and landmarks over time,
fits a similarity transform from the five landmarks of every frame to the canonical template
(:func:`.align.umeyama`) and warps the frames into ``size x size`` crops
(:func:`.align.warp_faces`). It returns one :class:`FaceTrack` (the main face) or, with
``all_faces=True``, one per face.

Frames where a track has no face are kept: ``present`` is False, boxes / landmarks / transforms
are NaN, the crop is zeros, and :meth:`FaceTrack.rows` writes empty values with ``face = 0``.
A video with no face at all raises :class:`NoFaceError`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .align import DEFAULT_MARGIN, LANDMARK_NAMES, apply_affine, face_template, umeyama, warp_faces
from .detect import Detections, FaceDetector, MTCNNDetector
from .track import link_detections, smooth_over_time, track_prominence

__all__ = [
    "FACE_COLUMNS",
    "FaceTrack",
    "NoFaceError",
    "detect_align_track",
    "detect_faces",
    "looks_like_face_crop",
    "nearest_present",
    "write_face_csv",
]

#: Per-frame face columns written by :meth:`FaceTrack.rows` / :func:`write_face_csv`.
FACE_COLUMNS: tuple[str, ...] = (
    "face",
    "face_score",
    "face_x1",
    "face_y1",
    "face_x2",
    "face_y2",
    *(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y")),
)


class NoFaceError(ValueError):
    """The detector found no face in any frame of the input."""


def _no_face(n: int) -> NoFaceError:
    return NoFaceError(f"no face found in the video (expected at least one frame with a face, got none in {n} frames)")


@dataclass
class FaceTrack:
    """One face followed through a video of ``N`` frames (all tensors on the CPU, float32).

    Attributes:
        track_id: rank of the track by prominence (``0``: the main face).
        present: ``[N]`` bool, whether the face was detected in each frame.
        boxes: ``[N, 4]`` ``(x1, y1, x2, y2)`` frame pixels, smoothed over time; NaN where absent.
        scores: ``[N]`` detection probabilities; NaN where absent.
        landmarks: ``[N, 5, 2]`` frame pixels (:data:`~.align.LANDMARK_NAMES` order), smoothed
            over time (these drive the alignment); NaN where absent.
        matrices: ``[N, 2, 3]`` frame -> crop similarity transforms; NaN where absent.
        crops: ``[N, 3, size, size]`` aligned crops, RGB in ``[0, 1]``; zeros where absent.
        frame_size: ``(H, W)`` of the input frames.
        size: crop side in pixels.
        margin: template margin used (see :func:`~.align.face_template`).
        prominence: the track's prominence score (see :func:`~.track.track_prominence`).
    """

    track_id: int
    present: Tensor
    boxes: Tensor
    scores: Tensor
    landmarks: Tensor
    matrices: Tensor
    crops: Tensor
    frame_size: tuple[int, int]
    size: int
    margin: float
    prominence: float

    @property
    def num_frames(self) -> int:
        return self.present.shape[0]

    def crop_landmarks(self) -> Tensor:
        """``[N, 5, 2]`` the landmarks mapped into crop pixels (NaN where absent)."""
        return apply_affine(self.matrices, self.landmarks)

    def template(self) -> Tensor:
        """``[5, 2]`` the canonical landmark positions in the crop."""
        return face_template(self.size, self.margin)

    def rows(self, *, decimals: int = 2) -> list[dict[str, int | float | str]]:
        """One dict per frame with the :data:`FACE_COLUMNS` (``""`` where the face is absent)."""
        out: list[dict[str, int | float | str]] = []
        present = self.present.tolist()
        boxes = self.boxes.tolist()
        scores = self.scores.tolist()
        lms = self.landmarks.reshape(self.num_frames, 10).tolist()
        for f in range(self.num_frames):
            if not present[f]:
                row: dict[str, int | float | str] = {c: "" for c in FACE_COLUMNS}
                row["face"] = 0
            else:
                values = [round(scores[f], 4)] + [round(v, decimals) for v in boxes[f] + lms[f]]
                row = {"face": 1, **dict(zip(FACE_COLUMNS[1:], values))}
            out.append(row)
        return out

    def __repr__(self) -> str:
        return (
            f"FaceTrack(track_id={self.track_id}, frames={self.num_frames}, "
            f"present={int(self.present.sum())}, frame_size={self.frame_size}, size={self.size}, "
            f"margin={self.margin}, prominence={self.prominence:.3f})"
        )


def write_face_csv(path: str | os.PathLike, track: FaceTrack, *, fps: float | None = None) -> str:
    """Write ``frame``, ``time_s`` (if ``fps``) and the :data:`FACE_COLUMNS`, one row per frame."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["frame", *(["time_s"] if fps else []), *FACE_COLUMNS])
        for f, row in enumerate(track.rows()):
            writer.writerow([f, *([f"{f / fps:.4f}"] if fps else []), *(row[c] for c in FACE_COLUMNS)])
    return path


def nearest_present(present: Tensor) -> Tensor:
    """``[N]`` index of the nearest frame with a face, for each frame (ties: the earlier one).

    Useful to build temporal windows that never feed an empty crop to a model: gather crops at
    ``nearest_present(track.present)`` and blank the outputs of frames with ``present == False``.

    Raises:
        NoFaceError: if no frame is present.
    """
    if present.dim() != 1 or present.dtype != torch.bool:
        raise ValueError(f"present: expected a [N] bool tensor, got {present.dtype} {tuple(present.shape)}")
    idx = present.nonzero().squeeze(1)
    if idx.numel() == 0:
        raise _no_face(present.numel())
    frames = torch.arange(present.numel())
    dist = (frames[:, None] - idx[None, :]).abs()
    return idx[dist.argmin(1)]  # argmin returns the first minimum: the earlier frame on ties


def _check_frames(frames: Tensor | np.ndarray) -> Tensor:
    """Validate the input layout: uint8 ``[N, H, W, 3]`` or floating ``[N, 3, H, W]`` in ``[0, 1]``."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames: expected a tensor or numpy array, got {type(frames).__name__}")
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 [N, H, W, 3] RGB, got shape {tuple(frames.shape)}")
    elif frames.is_floating_point():
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames: expected float [N, 3, H, W] RGB in [0, 1], got shape {tuple(frames.shape)}")
        if frames.numel():
            lo, hi = float(frames.amin()), float(frames.amax())
            if lo < -1e-3 or hi > 1 + 1e-3 or not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"frames: expected float values in [0, 1], got the range [{lo:.4g}, {hi:.4g}]")
    else:
        raise ValueError(f"frames: expected uint8 [N, H, W, 3] or float [N, 3, H, W] frames, got dtype {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames: expected at least one frame, got 0")
    return frames


def _hw(frames: Tensor) -> tuple[int, int]:
    return (frames.shape[1], frames.shape[2]) if frames.dtype == torch.uint8 else (frames.shape[2], frames.shape[3])


def _batch_hwc255(frames: Tensor, sl: slice, device: torch.device) -> Tensor:
    x = frames[sl].to(device)
    if x.dtype == torch.uint8:
        return x
    return (x.float().clamp(0, 1) * 255.0).permute(0, 2, 3, 1)


def _batch_chw01(frames: Tensor, idx: Tensor, device: torch.device) -> Tensor:
    x = frames[idx].to(device)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.float()


def detect_faces(
    frames: Tensor | np.ndarray,
    *,
    detector: FaceDetector | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 32,
) -> list[Detections]:
    """Run a face detector over all frames in batches: one :class:`~.detect.Detections` per frame.

    Args:
        frames: uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]`` RGB in ``[0, 1]``.
        detector: a :data:`~.detect.FaceDetector` (default: :class:`~.detect.MTCNNDetector` on
            ``device``).
        device: where frames are sent for detection (default: CPU).
        batch_size: frames per detector call.
    """
    frames = _check_frames(frames)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    detector = detector if detector is not None else MTCNNDetector(device=dev)
    out: list[Detections] = []
    for i in range(0, frames.shape[0], batch_size):
        batch = _batch_hwc255(frames, slice(i, i + batch_size), dev)
        dets = list(detector(batch))
        if len(dets) != batch.shape[0]:
            raise ValueError(f"detector: expected {batch.shape[0]} Detections for the batch, got {len(dets)}")
        out.extend(dets)
    return out


def looks_like_face_crop(
    frames: Tensor | np.ndarray,
    *,
    detector: FaceDetector | None = None,
    device: torch.device | str | None = None,
    num_samples: int = 5,
    min_area: float = 0.25,
) -> bool:
    """Whether a video is already a face crop (so it should be fed to a model as it is).

    Rule: detect faces in ``num_samples`` frames spread evenly over the video; the input is a face
    crop when, in at least half of them, the largest detected face box covers at least
    ``min_area`` of the frame. MTCNN's box covers about 40% of a crop made with this module's
    default template (and of tight DFER-style face crops), and well under 25% of the frame in
    interviews, webcam and lab recordings with background. A video with no face found is not a
    crop (and :func:`detect_align_track` will then report it with :class:`NoFaceError`).

    Returns:
        True if the frames look like face crops already.
    """
    frames = _check_frames(frames)
    n = frames.shape[0]
    k = max(1, min(num_samples, n))
    idx = torch.linspace(0, n - 1, k).round().long().unique()
    dets = detect_faces(frames[idx], detector=detector, device=device, batch_size=len(idx))
    h, w = _hw(frames)
    hits = 0
    for det in dets:
        if len(det):
            areas = (det.boxes[:, 2] - det.boxes[:, 0]).clamp(min=0) * (det.boxes[:, 3] - det.boxes[:, 1]).clamp(min=0)
            hits += int(float(areas.max()) / (h * w) >= min_area)
    return 2 * hits >= len(dets) and hits > 0


def detect_align_track(
    frames: Tensor | np.ndarray,
    *,
    size: int = 224,
    margin: float = DEFAULT_MARGIN,
    all_faces: bool = False,
    device: torch.device | str | None = None,
    detector: FaceDetector | None = None,
    batch_size: int = 32,
    smooth_sigma: float = 1.0,
    iou_threshold: float = 0.3,
    max_gap: int | None = 50,
    detections: Sequence[Detections] | None = None,
) -> list[FaceTrack]:
    """Detect, track and align the faces of a video.

    Args:
        frames: uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]`` RGB in ``[0, 1]`` (any device;
            moved to ``device`` batch by batch).
        size: side of the aligned crops (the model's input size).
        margin: template margin (see :func:`~.align.face_template`).
        all_faces: return every track (sorted by prominence) instead of only the main face.
        device: where detection and warping run (``"cuda"`` when the model is there; default CPU).
        detector: a :data:`~.detect.FaceDetector` (default: :class:`~.detect.MTCNNDetector`).
        batch_size: frames per detector / warp call.
        smooth_sigma: std, in frames, of the Gaussian smoothing of boxes and landmarks (``0``: off).
        iou_threshold: smallest box IoU that continues a track from one frame to the next.
        max_gap: frames a track may miss before it is closed (``None``: never).
        detections: precomputed per-frame detections (skip detection; ``N`` of them).

    Returns:
        ``[main track]``, or all tracks with ``all_faces=True``; each a :class:`FaceTrack` of
        ``N`` frames (tensors on the CPU).

    Raises:
        NoFaceError: no face in any frame.
        FacesExtraMissingError: no ``detector`` given and facenet-pytorch is not installed.

    Examples::

        >>> tracks = detect_align_track(video_uint8, size=224)  # doctest: +SKIP
        >>> track = tracks[0]
        >>> track.crops.shape, track.present.shape  # doctest: +SKIP
        (torch.Size([N, 3, 224, 224]), torch.Size([N]))
    """
    frames = _check_frames(frames)
    template = face_template(size, margin, dtype=torch.float64)
    n = frames.shape[0]
    h, w = _hw(frames)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if detections is None:
        detections = detect_faces(frames, detector=detector, device=dev, batch_size=batch_size)
    elif len(detections) != n:
        raise ValueError(f"detections: expected one per frame ({n}), got {len(detections)}")
    links = link_detections(detections, iou_threshold=iou_threshold, max_gap=max_gap)
    if not links:
        raise _no_face(n)
    ranked = sorted(
        ((track_prominence(detections, t, (h, w)), i, t) for i, t in enumerate(links)), key=lambda x: (-x[0], x[1])
    )
    if not all_faces:
        ranked = ranked[:1]
    tracks = []
    for rank, (prominence, _, link) in enumerate(ranked):
        present = link >= 0
        boxes = torch.full((n, 4), math.nan)
        scores = torch.full((n,), math.nan)
        lms = torch.full((n, 5, 2), math.nan)
        for f in present.nonzero().squeeze(1).tolist():
            k = int(link[f])
            boxes[f], scores[f], lms[f] = detections[f].boxes[k], detections[f].scores[k], detections[f].landmarks[k]
        boxes = smooth_over_time(boxes, present, smooth_sigma)
        lms = smooth_over_time(lms, present, smooth_sigma)
        idx = present.nonzero().squeeze(1)
        matrices = torch.full((n, 2, 3), math.nan)
        matrices[idx] = umeyama(lms[idx].double(), template).float()
        crops = torch.zeros(n, 3, size, size)
        for i in range(0, idx.numel(), batch_size):
            sel = idx[i : i + batch_size]
            crops[sel] = warp_faces(_batch_chw01(frames, sel, dev), matrices[sel].to(dev), size).clamp_(0, 1).cpu()
        tracks.append(
            FaceTrack(
                track_id=rank,
                present=present,
                boxes=boxes,
                scores=scores,
                landmarks=lms,
                matrices=matrices,
                crops=crops,
                frame_size=(h, w),
                size=size,
                margin=float(margin),
                prominence=prominence,
            )
        )
    return tracks
