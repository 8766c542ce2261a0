"""Five-point face alignment: a canonical template, a least-squares similarity fit, a batched warp.

Coordinates are image pixels with pixel *centres* at integer positions (pixel ``(0, 0)`` spans
``[-0.5, 0.5]^2``), ``x`` to the right, ``y`` down, the convention of MTCNN's landmarks. A
transform is a ``[..., 2, 3]`` matrix ``M`` mapping a frame point ``p`` to the crop point
``M[:, :2] @ p + M[:, 2]``.

* :func:`face_template` -- the five canonical points (left eye, right eye, nose tip, left and
  right mouth corner, "left" meaning the image left) in a ``size x size`` crop: the ArcFace /
  InsightFace 112-pixel template, zoomed out about the crop centre by ``1 + margin``.
* :func:`umeyama` -- least-squares similarity (rotation, uniform scale, translation; no
  reflection) from point sets to a template (Umeyama, 1991), batched, any dimension.
* :func:`warp_faces` -- resample ``[B, 3, H, W]`` frames into ``[B, 3, size, size]`` crops with
  ``grid_sample`` (on the frames' device), pre-shrinking frames that would otherwise be
  downsampled by more than 2x so the crop does not alias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "DEFAULT_MARGIN",
    "LANDMARK_NAMES",
    "apply_affine",
    "face_template",
    "invert_affine",
    "umeyama",
    "warp_faces",
]

#: Names of MTCNN's five landmarks, in its order (image left / right).
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

#: The widely used ArcFace / InsightFace five-point template of 112 x 112 aligned faces (pixels).
ARCFACE_TEMPLATE_112: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

#: Default zoom-out of the template: the crop is ``1 + margin`` times the ArcFace crop, so the
#: whole face (brows to chin, both cheeks) is inside it, like the pre-cropped DFEW / FERV39K / MAFW
#: faces the released models were trained on (see docs/video.md).
DEFAULT_MARGIN: float = 0.25


def face_template(
    size: int, margin: float = DEFAULT_MARGIN, *, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """The five canonical landmark positions in a ``size x size`` crop.

    The ArcFace 112-pixel template is read as fractions of the crop (``(p + 0.5) / 112``), zoomed out
    about the crop centre by ``1 + margin`` and scaled to ``size`` pixels.

    Args:
        size: crop side in pixels (``> 0``).
        margin: extra context around the ArcFace crop, as a fraction of it (``> -1``); ``0`` gives
            the tight ArcFace crop, ``0.25`` (default) a crop 1.25x larger.

    Returns:
        ``[5, 2]`` ``(x, y)`` pixel coordinates, in :data:`LANDMARK_NAMES` order.

    Examples::

        >>> face_template(112, margin=0.0)[0]
        tensor([38.2946, 51.6963])
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int (expected e.g. 224, got {size!r})")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > -1.0):
        raise ValueError(f"margin must be a finite number > -1 (expected e.g. 0.25, got {margin!r})")
    unit = (torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float64) + 0.5) / 112.0
    unit = 0.5 + (unit - 0.5) / (1.0 + margin)
    return (unit * size - 0.5).to(dtype=dtype, device=device)


def umeyama(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity transform from ``src`` points to ``dst`` points (Umeyama, 1991).

    Minimises ``sum_p || s R src_p + t - dst_p ||^2`` over a rotation ``R`` (``det R = +1``, no
    reflection), a scale ``s > 0`` and a translation ``t``, in closed form from the SVD of the
    cross-covariance. Computed in float64 and returned in ``src``'s dtype.

    Args:
        src: ``[..., P, D]`` points (``P >= 2``, not all equal).
        dst: ``[..., P, D]`` or ``[P, D]`` target points (broadcast over the batch).

    Returns:
        ``[..., D, D + 1]`` matrices ``[s R | t]``.

    Examples::

        >>> src = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> umeyama(src, 2 * src + 3).round(decimals=6)
        tensor([[2., 0., 3.],
                [0., 2., 3.]])
    """
    if src.dim() < 2 or src.shape[-1] < 1 or src.shape[-2] < 2:
        raise ValueError(f"src: expected [..., P, D] points with P >= 2, got shape {tuple(src.shape)}")
    if dst.shape[-2:] != src.shape[-2:]:
        raise ValueError(
            f"dst: expected the points' shape [P, D] = {list(src.shape[-2:])} of src, got {tuple(dst.shape)}"
        )
    out_dtype = src.dtype if src.is_floating_point() else torch.float32
    x = src.to(torch.float64)
    y = dst.to(device=src.device, dtype=torch.float64).expand_as(x)
    d = x.shape[-1]
    mx, my = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    xc, yc = x - mx, y - my
    var_x = xc.square().sum((-2, -1)) / x.shape[-2]  # [...]
    cov = yc.transpose(-2, -1) @ xc / x.shape[-2]  # [..., D, D]
    u, sv, vh = torch.linalg.svd(cov)
    sign = torch.ones(*cov.shape[:-1], dtype=torch.float64, device=cov.device)  # [..., D]
    sign[..., -1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    rot = u @ (sign.unsqueeze(-1) * vh)
    scale = (sv * sign).sum(-1) / var_x  # var_x == 0 (all points equal) -> inf / nan, caller's data
    a = scale[..., None, None] * rot
    t = my.squeeze(-2) - (a @ mx.transpose(-2, -1)).squeeze(-1)
    return torch.cat([a, t.unsqueeze(-1)], dim=-1).to(out_dtype)


def apply_affine(matrix: Tensor, points: Tensor) -> Tensor:
    """Map points through affine matrices.

    Args:
        matrix: ``[..., 2, 3]``.
        points: ``[..., P, 2]`` (batch dims broadcast with ``matrix``'s).

    Returns:
        ``[..., P, 2]`` transformed points.
    """
    if matrix.shape[-2:] != (2, 3):
        raise ValueError(f"matrix: expected [..., 2, 3], got shape {tuple(matrix.shape)}")
    if points.shape[-1] != 2:
        raise ValueError(f"points: expected [..., P, 2], got shape {tuple(points.shape)}")
    return points @ matrix[..., :2].transpose(-2, -1) + matrix[..., 2].unsqueeze(-2)


def invert_affine(matrix: Tensor) -> Tensor:
    """Inverse of ``[..., 2, 3]`` affine matrices (``[..., 2, 3]``)."""
    if matrix.shape[-2:] != (2, 3):
        raise ValueError(f"matrix: expected [..., 2, 3], got shape {tuple(matrix.shape)}")
    inv = torch.linalg.inv(matrix[..., :2])
    return torch.cat([inv, -(inv @ matrix[..., 2:])], dim=-1)


def warp_faces(frames: Tensor, matrix: Tensor, size: int, *, antialias: bool = True) -> Tensor:
    """Resample frames into aligned ``size x size`` crops (bilinear; zeros outside the frame).

    Args:
        frames: ``[B, C, H, W]`` floating frames (any range; returned in the same range).
        matrix: ``[B, 2, 3]`` frame -> crop transforms (finite).
        size: crop side in pixels.
        antialias: shrink a frame first (antialiased bilinear resize by a power of two) when the
            crop samples it more than 2x more coarsely than its pixels.

    Returns:
        ``[B, C, size, size]`` crops on ``frames``' device and dtype.
    """
    if frames.dim() != 4 or not frames.is_floating_point():
        raise ValueError(
            f"frames: expected a floating [B, C, H, W] tensor, got {frames.dtype} of shape {tuple(frames.shape)}"
        )
    if matrix.shape != (frames.shape[0], 2, 3):
        raise ValueError(f"matrix: expected [B, 2, 3] = {[frames.shape[0], 2, 3]}, got {tuple(matrix.shape)}")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int (expected e.g. 224, got {size!r})")
    b, c, h, w = frames.shape
    out = frames.new_zeros(b, c, size, size)
    if b == 0:
        return out
    m = matrix.to(device=frames.device, dtype=torch.float64)
    inv = invert_affine(m)  # crop -> frame
    # frame pixels per crop pixel; a power-of-two pre-shrink factor per frame when >= 2
    step = 1.0 / m[:, :, :2].det().abs().sqrt()
    factor = torch.ones_like(step) if not antialias else torch.exp2(torch.floor(torch.log2(step.clamp(min=1.0))))
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64, device=frames.device),
        torch.arange(size, dtype=torch.float64, device=frames.device),
        indexing="ij",
    )
    grid_pts = torch.stack([xs, ys], dim=-1).reshape(1, size * size, 2)
    src = apply_affine(inv, grid_pts)  # [B, S*S, 2] frame pixel coordinates
    for f in torch.unique(factor).tolist():
        idx = (factor == f).nonzero().squeeze(1)
        img = frames[idx]
        if f > 1:
            shrunk = (max(1, round(h / f)), max(1, round(w / f)))
            img = F.interpolate(img, size=shrunk, mode="bilinear", align_corners=False, antialias=True)
        pts = src[idx]
        # frame pixel -> normalised [-1, 1] (align_corners=False), the same for the shrunk frame
        gx = (pts[..., 0] + 0.5) * (2.0 / w) - 1.0
        gy = (pts[..., 1] + 0.5) * (2.0 / h) - 1.0
        grid = torch.stack([gx, gy], dim=-1).reshape(len(idx), size, size, 2).to(frames.dtype)
        out[idx] = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out
