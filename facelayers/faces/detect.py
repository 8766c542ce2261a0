"""Face detectors: the per-frame detection record, the detector interface, MTCNN (facenet-pytorch).

A detector is any callable ``detector(images) -> list[Detections]`` taking a batch of frames as a
``[B, H, W, 3]`` tensor of RGB values in ``[0, 255]`` (uint8 or float) and returning one
:class:`Detections` per frame. :class:`MTCNNDetector` wraps the MTCNN of ``facenet-pytorch``
(optional extra ``faces``: ``pip install "facelayers[faces]"``), whose wheel ships the P/R/O-net
weights, so it runs offline. ``facenet_pytorch`` is imported only when a detector is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Detections",
    "FaceDetector",
    "FacesExtraMissingError",
    "MTCNNDetector",
    "require_facenet",
]

FaceDetector = Callable[[Tensor], Sequence["Detections"]]
"""``detector(images [B, H, W, 3] in [0, 255]) -> list of B`` :class:`Detections`."""


class FacesExtraMissingError(ImportError):
    """facenet-pytorch (the ``faces`` extra) is needed but not installed."""


def require_facenet() -> Any:
    """Import and return the ``facenet_pytorch`` module, or raise :class:`FacesExtraMissingError`."""
    try:
        import facenet_pytorch
    except ImportError as err:
        raise FacesExtraMissingError(
            "face detection needs facenet-pytorch (MTCNN), which is not installed (expected the "
            f"'faces' extra, got ImportError: {err}); install it with: pip install \"facelayers[faces]\" "
            "(or pip install facenet-pytorch==2.5.3), or pass detector=... yourself"
        ) from err
    return facenet_pytorch


@dataclass(frozen=True)
class Detections:
    """The faces found in one frame (``K >= 0`` of them), on the CPU in float32.

    Attributes:
        boxes: ``[K, 4]`` ``(x1, y1, x2, y2)`` pixel boxes.
        scores: ``[K]`` detection probabilities.
        landmarks: ``[K, 5, 2]`` ``(x, y)`` of left eye, right eye, nose, left and right mouth
            corner (image left / right).
    """

    boxes: Tensor
    scores: Tensor
    landmarks: Tensor

    def __post_init__(self) -> None:
        k = self.boxes.shape[0] if self.boxes.dim() == 2 else -1
        if self.boxes.shape != (k, 4) or self.scores.shape != (k,) or self.landmarks.shape != (k, 5, 2):
            raise ValueError(
                "Detections: expected boxes [K, 4], scores [K], landmarks [K, 5, 2], got "
                f"{tuple(self.boxes.shape)}, {tuple(self.scores.shape)}, {tuple(self.landmarks.shape)}"
            )

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @classmethod
    def empty(cls) -> Detections:
        """A frame with no face."""
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))

    def filter(self, keep: Tensor) -> Detections:
        """The detections selected by a ``[K]`` bool mask or an index tensor."""
        return Detections(self.boxes[keep], self.scores[keep], self.landmarks[keep])


class MTCNNDetector:
    """MTCNN face detector with five landmarks (facenet-pytorch), batched over frames.

    Args:
        device: where the three networks run (``None``: CPU). Frames are moved there per batch.
        min_face_size: smallest face side searched for, in pixels.
        thresholds: P-, R- and O-net score thresholds (MTCNN's defaults).
        min_score: drop detections whose final (O-net) probability is below this.
        factor: scale step of the image pyramid.

    Raises:
        FacesExtraMissingError: if facenet-pytorch is not installed.

    Examples::

        >>> det = MTCNNDetector()  # doctest: +SKIP
        >>> dets = det(torch.zeros(2, 160, 160, 3, dtype=torch.uint8))  # doctest: +SKIP
        >>> [len(d) for d in dets]  # doctest: +SKIP
        [0, 0]
    """

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        min_score: float = 0.9,
        factor: float = 0.709,
    ) -> None:
        facenet = require_facenet()
        if min_face_size < 12:
            raise ValueError(f"min_face_size: expected >= 12 pixels (MTCNN's P-net input), got {min_face_size}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score: expected a probability in [0, 1], got {min_score}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.min_score = float(min_score)
        self.factor = float(factor)
        # the three nets load their bundled weights (torch.load of plain state dicts; weights_only
        # is the default of torch >= 2.6)
        self.mtcnn = facenet.MTCNN(
            min_face_size=self.min_face_size,
            thresholds=list(self.thresholds),
            factor=self.factor,
            keep_all=True,
            select_largest=False,
            device=self.device,
        ).eval()

    def __repr__(self) -> str:
        return (
            f"MTCNNDetector(device={self.device}, min_face_size={self.min_face_size}, "
            f"thresholds={self.thresholds}, min_score={self.min_score}, factor={self.factor})"
        )

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[Detections]:
        """Detect faces in ``images [B, H, W, 3]`` (RGB in ``[0, 255]``): ``B`` :class:`Detections`.

        Images whose shorter side is below ``min_face_size`` cannot hold a face MTCNN searches for
        (its image pyramid would be empty): they get empty :class:`Detections` (no face)."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected [B, H, W, 3] RGB in [0, 255], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            return []
        if min(images.shape[1], images.shape[2]) < self.min_face_size:
            return [Detections.empty() for _ in range(images.shape[0])]
        from facenet_pytorch.models.utils.detect_face import detect_face

        batch_boxes, batch_points = detect_face(
            images.to(self.device),
            self.min_face_size,
            self.mtcnn.pnet,
            self.mtcnn.rnet,
            self.mtcnn.onet,
            list(self.thresholds),
            self.factor,
            self.device,
        )
        out = []
        for boxes, points in zip(batch_boxes, batch_points):
            boxes = torch.as_tensor(boxes.astype("float32")).reshape(-1, 5)
            points = torch.as_tensor(points.astype("float32")).reshape(-1, 5, 2)
            det = Detections(boxes[:, :4].contiguous(), boxes[:, 4].contiguous(), points)
            out.append(det.filter(det.scores >= self.min_score))
        return out
