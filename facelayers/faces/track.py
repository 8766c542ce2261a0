"""Face tracking over a video: link per-frame detections into tracks by box overlap, rank them,
smooth them.

* :func:`link_detections` -- greedy frame-to-frame association by IoU with each track's last box;
  a track survives ``max_gap`` frames without a detection; unmatched detections start new tracks.
* :func:`track_prominence` -- how much a track is "the" face of the video: the sum over its frames
  of ``score * sqrt(box area / frame area) * exp(-2 (d / half diagonal)^2)``, ``d`` the distance of
  the box centre from the frame centre. Large, central, long-lived faces win.
* :func:`smooth_over_time` -- Gaussian smoothing over frames, within each run of consecutive
  present frames (never across a gap, never inventing values for absent frames).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .detect import Detections

__all__ = ["link_detections", "smooth_over_time", "track_prominence"]


def link_detections(
    detections: Sequence[Detections], *, iou_threshold: float = 0.3, max_gap: int | None = 50
) -> list[Tensor]:
    """Group detections into tracks.

    Frame by frame, the (track, detection) pairs are matched greedily in decreasing IoU of the
    track's last box and the detection's box, down to ``iou_threshold``; each track and detection
    is used at most once per frame.

    Args:
        detections: one :class:`Detections` per frame (``N`` frames).
        iou_threshold: smallest box IoU that continues a track (in ``(0, 1]``).
        max_gap: frames a track may go without a detection before it is closed (``None``: never).

    Returns:
        one ``[N]`` long tensor per track, in order of first appearance: the index of the
        track's detection in each frame, ``-1`` where the track has none.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in (0, 1], got {iou_threshold}")
    if max_gap is not None and max_gap < 0:
        raise ValueError(f"max_gap: expected None or >= 0 frames, got {max_gap}")
    n = len(detections)
    tracks: list[Tensor] = []
    last_box: list[Tensor] = []
    last_seen: list[int] = []
    for f, det in enumerate(detections):
        active = [i for i in range(len(tracks)) if max_gap is None or f - last_seen[i] - 1 <= max_gap]
        used: set[int] = set()
        if active and len(det):
            iou = box_iou(torch.stack([last_box[i] for i in active]).double(), det.boxes.double())
            order = torch.argsort(iou.flatten(), descending=True, stable=True)
            taken: set[int] = set()
            for flat in order.tolist():
                a, k = divmod(flat, iou.shape[1])
                if iou[a, k] < iou_threshold:
                    break
                if a in taken or k in used:
                    continue
                t = active[a]
                tracks[t][f] = k
                last_box[t], last_seen[t] = det.boxes[k], f
                taken.add(a)
                used.add(k)
        for k in range(len(det)):
            if k not in used:
                idx = torch.full((n,), -1, dtype=torch.long)
                idx[f] = k
                tracks.append(idx)
                last_box.append(det.boxes[k])
                last_seen.append(f)
    return tracks


def track_prominence(
    detections: Sequence[Detections], track: Tensor, frame_size: tuple[int, int]
) -> float:
    """Prominence of one track (see the module docstring); ``frame_size`` is ``(H, W)``."""
    h, w = frame_size
    half_diag = 0.5 * math.hypot(h, w)
    total = 0.0
    for f in (track >= 0).nonzero().squeeze(1).tolist():
        det = detections[f]
        k = int(track[f])
        x1, y1, x2, y2 = det.boxes[k].double().tolist()
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0) / (h * w)
        d = math.hypot(0.5 * (x1 + x2) - 0.5 * (w - 1), 0.5 * (y1 + y2) - 0.5 * (h - 1)) / half_diag
        total += float(det.scores[k]) * math.sqrt(area) * math.exp(-2.0 * d * d)
    return total


def smooth_over_time(values: Tensor, present: Tensor, sigma: float) -> Tensor:
    """Gaussian-smooth per-frame values within runs of consecutive present frames.

    Each present frame becomes the Gaussian-weighted mean (std ``sigma`` frames, window
    ``+-3 sigma``) of the present frames of its own run; weights are renormalised at run ends.
    Absent frames keep their values (e.g. NaN).

    Args:
        values: ``[N, ...]`` per-frame values.
        present: ``[N]`` bool.
        sigma: std of the kernel in frames; ``0`` returns a copy.

    Returns:
        ``[N, ...]`` smoothed values (same dtype).
    """
    if present.shape != values.shape[:1] or present.dtype != torch.bool:
        raise ValueError(
            f"present: expected a [N] = [{values.shape[0]}] bool tensor, got {present.dtype} {tuple(present.shape)}"
        )
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite value >= 0 frames, got {sigma}")
    out = values.clone()
    if sigma == 0 or values.shape[0] == 0:
        return out
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    p = present.tolist()
    n = len(p)
    start = 0
    while start < n:
        if not p[start]:
            start += 1
            continue
        end = start
        while end < n and p[end]:
            end += 1
        run = values[start:end].double().reshape(end - start, -1)  # [L, D]
        length = end - start
        pos = torch.arange(length)
        j = pos[:, None] + torch.arange(-radius, radius + 1)[None, :]  # [L, 2r+1]
        valid = (j >= 0) & (j < length)
        wgt = kernel[None, :] * valid
        wgt = wgt / wgt.sum(1, keepdim=True)
        gathered = run[j.clamp(0, length - 1)]  # [L, 2r+1, D]
        smoothed = (wgt.unsqueeze(-1) * gathered).sum(1)
        out[start:end] = smoothed.reshape(values[start:end].shape).to(values.dtype)
        start = end
    return out
