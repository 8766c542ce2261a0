"""Face stage for raw videos: detection (MTCNN), tracking, five-point alignment, aligned crops.

Turns a video with background (interview, webcam, lab recording) into the aligned face crops the
models were trained on, one :class:`FaceTrack` per face, plus per-frame face records (box,
score, five landmarks, ``face`` 0/1) and a contact sheet of the crops. See docs/video.md.

Detection uses ``facenet-pytorch`` (optional extra: ``pip install "facelayers[faces]"``), imported
only when a detector is built; alignment, tracking and the sheet need only torch / Pillow.

Examples::

    >>> from facelayers.faces import detect_align_track, save_contact_sheet, write_face_csv
    >>> (track,) = detect_align_track(frames_uint8_NHW3, size=224, device="cuda")  # doctest: +SKIP
    >>> track.crops.shape                                   # [N, 3, 224, 224], zeros where face=0
    >>> write_face_csv("faces.csv", track, fps=25.0)        # doctest: +SKIP
    >>> save_contact_sheet(track, "face_crops.png")         # doctest: +SKIP
"""

from __future__ import annotations

from .align import (
    ARCFACE_TEMPLATE_112,
    DEFAULT_MARGIN,
    LANDMARK_NAMES,
    apply_affine,
    face_template,
    invert_affine,
    umeyama,
    warp_faces,
)
from .detect import Detections, FaceDetector, FacesExtraMissingError, MTCNNDetector, require_facenet
from .pipeline import (
    FACE_COLUMNS,
    FaceTrack,
    NoFaceError,
    detect_align_track,
    detect_faces,
    looks_like_face_crop,
    nearest_present,
    write_face_csv,
)
from .sheet import contact_sheet, save_contact_sheet
from .track import link_detections, smooth_over_time, track_prominence

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "DEFAULT_MARGIN",
    "Detections",
    "FACE_COLUMNS",
    "FaceDetector",
    "FaceTrack",
    "FacesExtraMissingError",
    "LANDMARK_NAMES",
    "MTCNNDetector",
    "NoFaceError",
    "apply_affine",
    "contact_sheet",
    "detect_align_track",
    "detect_faces",
    "face_template",
    "invert_affine",
    "link_detections",
    "looks_like_face_crop",
    "nearest_present",
    "require_facenet",
    "save_contact_sheet",
    "smooth_over_time",
    "track_prominence",
    "umeyama",
    "warp_faces",
]
