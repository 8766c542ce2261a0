"""Running a trained reference SSM over a face video: per-frame AU probabilities and windowed
expression probabilities (``examples/predict_video.py`` is the CLI around it).

Every frame is encoded once per task by the vision encoder; windows reuse the frame features.
With a ``present`` mask (the frames where the face stage, :mod:`facelayers.faces`, found the face)
only those frames are encoded; a window slot on a frame without a face takes the features of the
nearest frame with one (:func:`facelayers.faces.nearest_present`), so no window ever sees an
empty crop, and the outputs of frames / windows without a face are NaN (never dropped or shifted).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .model import SSMModel

__all__ = ["VideoReadError", "read_frames", "au_window_indices", "expression_windows", "predict_video"]


class VideoReadError(ValueError):
    """A video file or frame folder cannot be read; the message names the file and the problem."""


def read_frames(source: str | os.PathLike) -> tuple[Tensor, float | None]:
    """``[N, 3, H, W]`` float frames in ``[0, 1]`` and the frame rate (``None`` for image folders).

    Args:
        source: a video file (decoded with PyAV) or a folder of frame images (natural order).

    Raises:
        VideoReadError: missing input, no frames, an unreadable / truncated image or video (naming
            the file), frames of different sizes.
    """
    from facelayers.data import list_frame_files, load_frame, read_video_frames

    source = os.fspath(source)
    fps = None
    if os.path.isdir(source):
        names = list_frame_files(source)
        if not names:
            raise VideoReadError(f"{source}: no image frames in this folder (expected .jpg/.png frames, got none)")
        frames = []
        for n in names:
            path = os.path.join(source, n)
            try:
                frames.append(load_frame(path))
            except (OSError, ValueError, SyntaxError) as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise VideoReadError(f"{path}: cannot decode this image (expected a complete image file, got: {msg})") from None
    elif os.path.isfile(source):
        if os.path.getsize(source) == 0:
            raise VideoReadError(f"{source}: empty file (expected a video, got 0 bytes)")
        try:
            frames = read_video_frames(source)
        except ImportError as err:
            raise VideoReadError(f"{source}: reading video files needs PyAV (expected `pip install av`, got "
                                 f"ImportError: {err})") from None
        except Exception as err:  # noqa: BLE001 - PyAV raises its own error classes for bad files
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise VideoReadError(f"{source}: cannot decode this video (expected a video file PyAV can read, got: {msg})") from None
        try:
            import av

            with av.open(source) as c:
                rate = c.streams.video[0].average_rate
                fps = float(rate) if rate else None
        except Exception:  # noqa: BLE001 - the frame rate is only used for a time column
            fps = None
        if not frames:
            raise VideoReadError(f"{source}: no frames decoded (expected a video with at least one frame, got 0)")
    else:
        raise VideoReadError(f"{source}: not found (expected a video file or a folder of frames, got no such path)")
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise VideoReadError(f"{source}: frames of different sizes (expected one size, got {sorted(shapes)})")
    return torch.stack(frames), fps


def au_window_indices(n: int, t: int) -> Tensor:
    """``[n, t]`` frame indices: row ``i`` is the window whose centre slot ``t // 2`` is frame ``i``
    (edge frames repeated): :func:`facelayers.data.au_windows` with ``eval_cover=True`` over one
    continuous sequence, the planner the AU datasets use."""
    from facelayers.data import au_windows

    if n < 1 or t < 1:
        raise ValueError(f"au_window_indices needs n >= 1 and t >= 1 (expected >= 1, got n={n}, t={t})")
    return torch.tensor([w.frames for w in au_windows(range(n), t, eval_cover=True)], dtype=torch.long)


def expression_windows(n: int, t: int, window: int, stride: int) -> list[tuple[int, int, list[int]]]:
    """``(start, end_exclusive, T indices)`` per sliding window: ``T`` frames at the segment
    centres of each ``window``-frame window, every ``stride`` frames, the last window ending at
    the last frame (with ``stride <= window`` every frame lies in at least one window; a larger
    stride skips the frames between two windows, which :func:`predict_video` refuses).

    Two documented rules for short videos (``examples/predict_video.py`` prints a note for each):
    a ``window`` longer than the video (``window > n``) is ONE window over the whole video, and a
    window of fewer than ``t`` frames samples some frames more than once (segment centres, as
    :func:`facelayers.data.segment_indices` does for short clips).

    Raises:
        ValueError: ``n``, ``t``, ``window`` or ``stride`` < 1.
    """
    from facelayers.data import segment_indices

    for name, v in (("n", n), ("t", t), ("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expression_windows: {name} must be a positive int (expected >= 1, got {v!r})")
    window = min(window, n)
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [(s, s + window, [s + i for i in segment_indices(window, t, False)]) for s in starts]


@torch.no_grad()
def predict_video(model: SSMModel, frames: Tensor, *, window: int | None = None, stride: int | None = None,
                  batch: int = 64, device: str | torch.device = "cpu", present: Tensor | None = None) -> dict[str, object]:
    """Run a trained model over a video.

    Args:
        model: trained :class:`SSMModel` with a config (eval mode is set here).
        frames: ``[N, 3, H, W]`` in ``[0, 1]`` (any size; resized to the model's input size).
        window: expression window length in frames (default ``2 T``; longer than the video:
            one window over all of it, see :func:`expression_windows`).
        stride: expression window step, at most ``window`` (default ``window // 2``).
        batch: frames / windows per forward.
        device: where the model runs.
        present: optional ``[N]`` bool, the frames that hold a face (e.g. ``FaceTrack.present``;
            the other frames' content is never read). Only present frames are encoded; a window
            slot on a frame without a face uses the nearest frame with one (ties: the earlier).
            AU probabilities of frames without a face are NaN, and so are the expression
            probabilities of a window none of whose ``T`` sampled frames has a face.

    Returns:
        dict with ``au_probs [N, M]`` (or None), ``exp_windows`` list of ``(start, end)``,
        ``exp_probs [W, K]`` (or None) and ``exp_face_frames`` ``[W]`` long (how many of the ``T``
        frames each window samples have a face; ``T`` everywhere without ``present``).

    Raises:
        ValueError: ``frames`` not ``[N, 3, H, W]`` with ``N >= 1``, a non-positive window /
            stride / batch, ``stride > window``, or ``present`` not a ``[N]`` bool tensor.
        facelayers.faces.NoFaceError: ``present`` has no True frame.
    """
    from facelayers.data import eval_transform

    if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be [N, 3, H, W] with N >= 1, got {tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__}")
    n = frames.shape[0]
    if present is not None:
        if not isinstance(present, Tensor) or present.dtype != torch.bool or tuple(present.shape) != (n,):
            got = f"{present.dtype} {tuple(present.shape)}" if isinstance(present, Tensor) else type(present).__name__
            raise ValueError(f"present must be a [N] bool tensor with N = {n} frames (expected torch.bool ({n},), got {got})")
        from facelayers.faces import nearest_present

        present = present.cpu()
        source = nearest_present(present)  # NoFaceError when no frame has a face
        keep = present.nonzero().squeeze(1)  # the frames that are encoded
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[keep] = torch.arange(keep.numel())
        feature_row = slot[source]  # frame -> row of the encoded features (its nearest present frame)
    else:
        keep, feature_row = None, torch.arange(n)
    for name, v in (("window", window), ("stride", stride), ("batch", batch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int (expected >= 1, got {v!r})")
    if model.cfg is None:
        raise ValueError("predict_video needs model.cfg (expected a model from build_model / load_model, got cfg=None)")
    t = model.cfg.num_frames
    window = window or 2 * t
    stride = stride or max(1, window // 2)
    if stride > window:
        raise ValueError(f"stride larger than window leaves frames without an expression prediction "
                         f"(expected stride <= window = {window}, got stride = {stride})")
    model = model.eval().to(device)
    cfg = model.cfg
    x = eval_transform(cfg.image_size)(frames.float() if keep is None else frames[keep].float())
    out: dict[str, object] = {"au_probs": None, "exp_windows": [], "exp_probs": None, "exp_face_frames": None}
    t_exp, t_au = model.text_features()

    def encode(task: str) -> Tensor:
        feats = [model.encode_task_frames(x[i : i + batch].to(device), task) for i in range(0, x.shape[0], batch)]
        return torch.cat(feats).float()[feature_row.to(device)]  # [N, ...]: one row per input frame

    if "au" in model.tasks:
        f = encode("au")
        idx = au_window_indices(n, t)
        probs = []
        for i in range(0, n, batch):
            logits = model.au_logits_from_features(f[idx[i : i + batch]], t_au)
            if logits.dim() == 3:  # model trained on all frames: read the centre slot
                logits = logits[:, t // 2]
            probs.append(logits.float().sigmoid().cpu())
        au = torch.cat(probs)
        if present is not None:
            au[~present] = float("nan")
        out["au_probs"] = au
    if "exp" in model.tasks:
        f = encode("exp")
        wins = expression_windows(n, t, window, stride)
        idx = torch.tensor([w[2] for w in wins])
        probs = []
        for i in range(0, len(wins), batch):
            logits = model.exp_logits_from_features(f[idx[i : i + batch]], t_exp)
            probs.append(logits.float().softmax(-1).cpu())
        exp = torch.cat(probs)
        faces = present[idx].sum(1) if present is not None else torch.full((len(wins),), t, dtype=torch.long)
        exp[faces == 0] = float("nan")
        out["exp_windows"] = [(w[0], w[1]) for w in wins]
        out["exp_probs"] = exp
        out["exp_face_frames"] = faces
    return out
