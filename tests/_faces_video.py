"""A short synthetic face video for the face-stage tests (tests/test_faces.py, tests/test_predict_faces.py).

Matplotlib's sample photo ``grace_hopper.jpg`` moved over 30 frames (shift, zoom 0.30 -> 0.38,
rotation -6 -> +6 degrees) with 5 frames of noise in the middle, warped with Pillow's affine
transform (independent of :func:`facelayers.faces.warp_faces`); :func:`write_mp4` stores frames
as an MPEG-4 file with PyAV.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from facelayers.faces import apply_affine, invert_affine

N_FACE, NOISE_AT, N_NOISE, FRAME = 30, 15, 5, 192


def similarity(scale: float, degrees: float, tx: float, ty: float, dtype=torch.float64) -> torch.Tensor:
    th = math.radians(degrees)
    c, s = scale * math.cos(th), scale * math.sin(th)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=dtype)


def pil_affine(image, matrix: torch.Tensor, size: tuple[int, int]):
    """Warp a PIL image by a frame->output ``[2, 3]`` matrix (pixel centres at integers) with
    Pillow's own affine transform (which maps output pixel centres ``x + 0.5`` to input coords)."""
    from PIL import Image

    inv = invert_affine(matrix.double())
    a = inv[:, :2]
    c = inv[:, 2] + 0.5 - a @ torch.full((2,), 0.5, dtype=torch.float64)
    data = (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1])
    return image.transform(size, Image.AFFINE, tuple(float(v) for v in data), resample=Image.BILINEAR)


def grace_hopper():
    """The sample photo as a PIL RGB image."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return Image.open(fh).convert("RGB")


def make_synthetic_video(detector=None) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """35 frames: Grace Hopper moving (shift, zoom 0.30 -> 0.38, rotation -6 -> +6 degrees), with
    5 frames of noise at 15..19.

    Args:
        detector: a face detector used to find the landmarks on the full-resolution photo (for the
            true landmark positions); ``None`` skips them.

    Returns:
        uint8 frames ``[35, 192, 192, 3]``, the indices of the 30 face frames, and the true
        landmark positions ``[30, 5, 2]`` in them (the detector's landmarks on the full-resolution
        photo, moved by the known transforms; ``None`` without a detector).
    """
    photo = grace_hopper()
    mats, face_frames = [], []
    for t in range(N_FACE):
        a = t / (N_FACE - 1)
        s, deg = 0.30 + 0.08 * a, -6.0 + 12.0 * a
        m = similarity(s, deg, 0.0, 0.0)
        centre = torch.tensor([256.0, 250.0], dtype=torch.float64)  # about the face centre in the photo
        target = torch.tensor([(0.40 + 0.2 * a) * FRAME, (0.45 + 0.1 * a) * FRAME], dtype=torch.float64)
        m[:, 2] = target - m[:, :2] @ centre
        mats.append(m)
        face_frames.append(torch.from_numpy(np.asarray(pil_affine(photo, m, (FRAME, FRAME))).copy()))
    g = torch.Generator().manual_seed(0)
    noise = [(torch.rand(FRAME, FRAME, 3, generator=g) * 255).to(torch.uint8) for _ in range(N_NOISE)]
    frames = torch.stack(face_frames[:NOISE_AT] + noise + face_frames[NOISE_AT:])
    face_idx = list(range(NOISE_AT)) + list(range(NOISE_AT + N_NOISE, N_FACE + N_NOISE))
    truth = None
    if detector is not None:
        photo_t = torch.from_numpy(np.asarray(photo).copy())
        (ref,) = detector(photo_t[None])  # landmarks on the full-resolution photo
        assert len(ref) == 1
        truth = apply_affine(torch.stack(mats), ref.landmarks[0].double())  # [30, 5, 2] frame pixels
    return frames, face_idx, truth


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int = 10) -> Path:
    """Write uint8 ``[N, H, W, 3]`` frames as an MPEG-4 video (PyAV, near-lossless quality)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"qscale": "2"}
        s.codec_context.qmin, s.codec_context.qmax = 1, 3
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f.numpy(), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return Path(path)
