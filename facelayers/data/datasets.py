"""Clip datasets over the public manifests: expression clips and AU frame windows.

:class:`ExpressionClipDataset` turns one :class:`~facelayers.data.ExpressionRecord` into a clip of
``T`` frames by segment sampling (:func:`segment_indices`). :class:`AUClipDataset` cuts the
labelled frames of each :class:`~facelayers.data.AURecord` sequence into ``T``-frame windows that
never span a missing frame number.

Frames are float tensors in ``[0, 1]`` (``ToTensor`` semantics); expression clips may also be video
files, decoded with PyAV (``av``, imported only when needed).

Decoding (``fast_decode=True``, the default): a clip's frames go to the transform still encoded
(:meth:`~facelayers.data.ClipTransform.apply_to_frames`), which crops and resizes them in uint8
(JPEGs much larger than the crop at reduced scale, ``draft=True``) and converts to float once at
output size; videos decode only up to the sampled frames, seeking to the keyframe before each one
(:func:`decode_video_frames`). ``fast_decode=False`` is the reference: every frame decoded to float
at full size (:func:`load_frame`, :func:`read_video_frames`), then the transform on the float clip.
Same random draws either way; results agree to the tolerances in :mod:`~facelayers.data.transforms`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .manifests import AURecord, ExpressionRecord, PathLike, get_format, read_manifest
from .transforms import ClipCompose, ClipTransform, FrameSizeMismatchError

__all__ = [
    "AUClipDataset",
    "AUWindow",
    "ExpressionClipDataset",
    "FrameCountMismatchError",
    "check_frame_counts",
    "FrameSampler",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "au_windows",
    "decode_video_frames",
    "full_windows",
    "list_frame_files",
    "load_frame",
    "natural_sort_key",
    "read_video_frames",
    "release_segment_indices",
    "segment_indices",
    "split_runs",
    "video_frame_count",
    "WindowPlanner",
]

#: File endings treated as frames inside an expression clip folder (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: File endings decoded as videos (with PyAV) when an expression record points to a file.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


class FrameCountMismatchError(ValueError):
    """An expression folder holds a different number of frames than its manifest line says."""


# ----------------------------------------------------------------------------------------------
# frame files and decoding

_NUM = re.compile(r"(\d+)")


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically: ``2.jpg`` < ``10.jpg``, ``f_9`` < ``f_10``."""
    parts = _NUM.split(name)
    return tuple((0, int(p)) if i % 2 else (1, p.lower()) for i, p in enumerate(parts)) + ((1, name),)


def list_frame_files(folder: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Names of the image files in ``folder``, in time order (natural sort of embedded numbers).

    Raises:
        FileNotFoundError: if ``folder`` is not a directory.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"frame folder not found: {folder} (expected a folder of frame images, got no such folder)")
    exts = tuple(e.lower() for e in extensions)
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and e.name.lower().endswith(exts)]
    return sorted(names, key=natural_sort_key)


def load_frame(path: PathLike) -> Tensor:
    """Decode one image with PIL: RGB float tensor ``[3, H, W]`` in ``[0, 1]``."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(path) as img:
            t = pil_to_tensor(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"frame image not found: {path}") from None
    return t.float().div_(255.0)


def read_video_frames(path: PathLike) -> list[Tensor]:
    """Decode every frame of a video file with PyAV: list of ``[3, H, W]`` float tensors in ``[0, 1]``.

    Raises:
        ImportError: if PyAV is not installed (``pip install av``).
    """
    av = _import_av(path)
    frames = []
    with av.open(os.fspath(path)) as container:
        for frame in container.decode(video=0):
            arr = frame.to_ndarray(format="rgb24")
            frames.append(torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0))
    if not frames:
        raise ValueError(f"no video frames decoded from {path}")
    return frames


def _import_av(path: PathLike) -> Any:
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is installed in the dev environment
        raise ImportError(
            f"decoding the video file {path} needs PyAV; install it with `pip install av`, "
            "or extract the frames into a folder of images"
        ) from e
    return av


def _packet_table(path: PathLike) -> tuple[list[int], list[int]] | None:
    """Presentation times of the video stream's frames (sorted = display order) and of its keyframes.

    Read from the container's packets without decoding. ``None`` when the table cannot identify
    frames (a packet without a timestamp, two packets with the same one).
    """
    av = _import_av(path)
    pts: list[int] = []
    keys: list[int] = []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None:
                continue  # end-of-stream flush packet
            if packet.pts is None:
                return None
            if packet.is_discard:  # outside an edit list: the decoder drops it
                continue
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
    if len(set(pts)) != len(pts):
        return None
    return sorted(pts), sorted(keys)


def _count_decoded(path: PathLike) -> int:
    av = _import_av(path)
    with av.open(os.fspath(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def video_frame_count(path: PathLike) -> int:
    """Number of frames :func:`read_video_frames` would decode, read from the container's packet
    table when it identifies every frame (no decoding), else by decoding the stream."""
    table = _packet_table(path)
    n = len(table[0]) if table is not None else _count_decoded(path)
    if n == 0:
        raise ValueError(f"no video frames decoded from {path}")
    return n


def _rgb_u8(frame: Any) -> Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def _decode_sequential(path: PathLike, need: list[int], stats: dict[str, int]) -> dict[int, Tensor]:
    """Decode from the start, convert the frames in ``need`` (decode-order indices), stop after the last."""
    av = _import_av(path)
    out: dict[int, Tensor] = {}
    wanted = set(need)
    with av.open(os.fspath(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            stats["decoded"] += 1
            if i in wanted:
                out[i] = _rgb_u8(frame)
                if len(out) == len(wanted):
                    break
    return out


def _decode_seeking(
    path: PathLike, need: list[int], pts: list[int], keys: list[int], stats: dict[str, int]
) -> dict[int, Tensor] | None:
    """Seek to the keyframe before each needed frame (unless already decoding towards it) and decode
    up to it; frames are identified by presentation time. ``None`` if the decoder disagrees with the
    packet table (a frame without or with an unknown timestamp, a seek past the target)."""
    import bisect

    av = _import_av(path)
    index_of = {p: i for i, p in enumerate(pts)}
    wanted = set(need)
    out: dict[int, Tensor] = {}
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        frames = None
        position: int | None = None  # presentation time of the last decoded frame
        for i in need:
            if i in out:
                continue
            target = pts[i]
            k = bisect.bisect_right(keys, target) - 1
            key = keys[k] if k >= 0 else pts[0]
            if frames is None or position is None or key > position or position >= target:
                container.seek(key, stream=stream, backward=True, any_frame=False)
                stats["seeks"] += 1
                frames = container.decode(stream)
                position = None
            for frame in frames:
                stats["decoded"] += 1
                if frame.pts is None or int(frame.pts) not in index_of:
                    return None
                p = int(frame.pts)
                if position is None and p > target:
                    return None  # the seek landed after the target
                position = p
                j = index_of[p]
                if j in wanted and j not in out:
                    out[j] = _rgb_u8(frame)
                if p >= target:
                    break
            if i not in out:
                return None
    return out


def decode_video_frames(
    path: PathLike, indices: Sequence[int], *, stats: dict[str, int] | None = None
) -> list[Tensor]:
    """Decode only the frames ``indices`` of a video (fast path): RGB uint8 tensors ``[3, H, W]``.

    Frame ``i`` is the ``i``-th frame :func:`read_video_frames` returns (display order), so
    ``decode_video_frames(p, idx)[k].float() / 255`` equals ``read_video_frames(p)[idx[k]]``. When
    the container's packets identify every frame by presentation time (mp4, mkv, webm, ...), the
    decoder seeks to the keyframe before each needed frame and stops at it, so frames of skipped
    GOPs and after the last needed frame are never decoded; otherwise it decodes from the start
    and stops after the last needed frame. If the decoder and the packet table disagree, it falls
    back to that sequential decode, so no frame is ever skipped or mislabelled.

    Args:
        path: Video file.
        indices: Frame indices (any order, repeats allowed) in ``[0, video_frame_count(path))``.
        stats: Optional dict that receives ``decoded`` (frames decoded) and ``seeks``.

    Returns:
        One tensor per entry of ``indices`` (a repeated index returns the same tensor object).

    Raises:
        IndexError: an index outside the video.
    """
    st = {"decoded": 0, "seeks": 0}
    need = sorted({int(i) for i in indices})
    if not need:
        raise ValueError(f"decode_video_frames: expected at least one frame index, got {list(indices)!r}")
    table = _packet_table(path)
    n = len(table[0]) if table is not None else None
    got: dict[int, Tensor] | None = None
    if table is not None:
        if need[0] < 0 or need[-1] >= len(table[0]):
            raise IndexError(f"frame indices must be in [0, {len(table[0])}) for {path} (expected indices < {len(table[0])}, got {need[0]}..{need[-1]})")
        got = _decode_seeking(path, need, table[0], table[1], st)
    if got is None:
        if need[0] < 0:
            raise IndexError(f"frame indices must be >= 0 (expected >= 0, got {need[0]})")
        got = _decode_sequential(path, need, st)
        missing = [i for i in need if i not in got]
        if missing:
            total = n if n is not None else _count_decoded(path)
            raise IndexError(f"frame indices must be in [0, {total}) for {path} (expected indices < {total}, got {missing[0]})")
    if stats is not None:
        stats.update(st)
    return [got[int(i)] for i in indices]


def _stack(frames: list[Tensor], where: str) -> Tensor:
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"frames of {where} have different sizes {sorted(shapes)}; resize them to one size")
    return torch.stack(frames)


def _apply_transform(transform: Callable | None, clip: Tensor, generator: torch.Generator | None) -> Tensor:
    if transform is None:
        return clip
    if isinstance(transform, ClipTransform):
        return transform(clip, generator)
    return transform(clip)


def _fast_clip(
    transform: Callable | None, frames: list[Any], generator: torch.Generator | None, where: str, draft: bool
) -> Tensor:
    """Fast path: encoded frames (paths or uint8 ``[3, H, W]``) -> transformed float clip.

    A :class:`ClipTransform` (or no transform) runs through ``apply_to_frames``; any other callable
    gets the float ``[0, 1]`` clip (decoded by the fast path, equal to the reference's).
    """
    t = transform if isinstance(transform, ClipTransform) else ClipCompose([])
    try:
        clip = t.apply_to_frames(frames, generator, draft=draft)
    except FrameSizeMismatchError as e:
        raise ValueError(f"{where}: {e}") from None
    if transform is not None and not isinstance(transform, ClipTransform):
        clip = transform(clip)
    return clip


def _item_generator(seed: int | None, epoch: int, index: int) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(hash((int(seed), int(epoch), int(index))) & ((1 << 63) - 1))


def _check_num_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int (expected an integer >= 1, got {num_frames!r})")


# ----------------------------------------------------------------------------------------------
# segment sampling

#: ``sampler(num_frames_in_clip, num_segments, train, generator) -> list[int]``: how an
#: :class:`ExpressionClipDataset` picks its ``T`` frames (:func:`segment_indices`,
#: :func:`release_segment_indices`).
FrameSampler = Callable[[int, int, bool, "torch.Generator | None"], "list[int]"]


def segment_indices(
    num_frames_in_clip: int, num_segments: int, train: bool, generator: torch.Generator | None = None
) -> list[int]:
    """Frame indices of ``T = num_segments`` segment samples over a clip of ``n`` frames.

    Specification (``n = num_frames_in_clip``, ``T = num_segments``, ``k = 0 .. T-1``):

    * ``n >= T``: segment ``k`` is the frame range ``[b_k, b_{k+1})`` with ``b_k = floor(k * n / T)``
      (``T`` disjoint, non-empty ranges covering all frames; lengths differ by at most one).
      Training picks ``b_k + randint(0, b_{k+1} - b_k - 1)`` per segment (independent draws from
      ``generator``); evaluation picks the centre ``b_k + (b_{k+1} - b_k) // 2``. Indices are
      strictly increasing.
    * ``n < T`` (train and eval alike, no randomness): ``[0, 1, ..., n-1]`` then the last frame
      repeated: ``min(k, n - 1)`` (edge padding).

    Args:
        num_frames_in_clip: ``n >= 1``.
        num_segments: ``T >= 1``.
        train: Random offsets (True) or segment centres (False).
        generator: RNG for the training draws (``None``: torch's global RNG).

    Returns:
        ``T`` indices in ``[0, n-1]``.

    Examples::

        >>> segment_indices(70, 16, train=False)[:4]
        [2, 6, 10, 15]
    """
    n, t = num_frames_in_clip, num_segments
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames_in_clip must be a positive int (expected an integer >= 1, got {n!r})")
    _check_num_frames(t)
    if n < t:
        return [min(k, n - 1) for k in range(t)]
    bounds = [(k * n) // t for k in range(t + 1)]
    lengths = [bounds[k + 1] - bounds[k] for k in range(t)]
    if not train:
        return [bounds[k] + lengths[k] // 2 for k in range(t)]
    offsets = (torch.rand(t, generator=generator, dtype=torch.float64) * torch.tensor(lengths, dtype=torch.float64)).floor()
    return [bounds[k] + min(int(offsets[k]), lengths[k] - 1) for k in range(t)]


def release_segment_indices(
    num_frames_in_clip: int, num_segments: int, train: bool, generator: torch.Generator | None = None
) -> list[int]:
    """Frame indices of ``T = num_segments`` samples over ``n`` frames, as the released SSM code picks them.

    The expression sampler of the released code (``ssm/data/emotion.py``, ``_get_train_indices`` /
    ``_get_test_indices`` with ``duration=1``; the TSN-style sampler SSM inherits from DFER-CLIP).
    A drop-in alternative to :func:`segment_indices` (same signature; pass it as
    ``ExpressionClipDataset(sampler=...)``). Specification (``n = num_frames_in_clip``,
    ``T = num_segments``, ``k = 0 .. T-1``):

    * training, ``n >= T``: ``a = n // T``; index ``k * a + randint(0, a - 1)`` (independent draws
      from ``generator``). Segments have the equal length ``a``, so the last ``n - T * a`` frames are
      never sampled (unlike :func:`segment_indices`, whose segments cover every frame).
    * evaluation, ``n > T``: ``tick = n / T``; index ``int(tick / 2 + tick * k)`` (Python floats, as
      the release computes it).
    * otherwise (``n < T`` in training, ``n <= T`` in evaluation; no randomness):
      ``[0, 1, ..., n-1]`` then the last frame repeated (edge padding), i.e. ``min(k, n - 1)``.

    The release draws with NumPy's global RNG; here the draws come from ``generator`` (the same
    distribution, not the same numbers).

    Args:
        num_frames_in_clip: ``n >= 1``.
        num_segments: ``T >= 1``.
        train: Random offsets (True) or the deterministic ticks (False).
        generator: RNG for the training draws (``None``: torch's global RNG).

    Returns:
        ``T`` non-decreasing indices in ``[0, n-1]``.

    Examples::

        >>> release_segment_indices(70, 16, train=False)[:4]
        [2, 6, 10, 15]
        >>> release_segment_indices(40, 16, train=False)[:4]
        [1, 3, 6, 8]
    """
    n, t = num_frames_in_clip, num_segments
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames_in_clip must be a positive int (expected an integer >= 1, got {n!r})")
    _check_num_frames(t)
    if train and n >= t:
        a = n // t
        offsets = torch.randint(0, a, (t,), generator=generator).tolist()
        return [k * a + int(offsets[k]) for k in range(t)]
    if not train and n > t:
        tick = n / float(t)
        return [int(tick / 2.0 + tick * k) for k in range(t)]
    return [min(k, n - 1) for k in range(t)]


# ----------------------------------------------------------------------------------------------
# expression clips


def check_frame_counts(
    records: Sequence[ExpressionRecord],
    root: PathLike,
    *,
    manifest: PathLike | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    allow_more: bool = True,
) -> None:
    """Refuse, before training, clips whose frame folder holds FEWER frames than the manifest says
    (a truncated or half-extracted clip would otherwise be sampled over what is there, with only a
    warning per item: :class:`ExpressionClipDataset` ``frame_count="disk"``). Video files and
    missing folders are skipped (:class:`ExpressionClipDataset` reports those when it reads them).

    Args:
        records: the manifest's records, in file order.
        root: dataset root.
        manifest: the manifest file, named in the error (with the clip's record number).
        extensions: file endings counted as frames.
        allow_more: accept folders with MORE frames than the manifest says (default True).

    Raises:
        FrameCountMismatchError: the first clip that disagrees, e.g. ``train.txt: record 3: clip
            '00005': manifest says 40 frames, found 4 (expected 40 frame files, got 4)``.
    """
    where = f"{os.fspath(manifest)}: " if manifest is not None else ""
    for i, rec in enumerate(records):
        src = Path(root) / rec.path
        if not src.is_dir():
            continue
        n = len(list_frame_files(src, extensions))
        if n < rec.num_frames or (n > rec.num_frames and not allow_more):
            raise FrameCountMismatchError(
                f"{where}record {i}: clip {rec.path!r}: manifest says {rec.num_frames} frames, found {n} in {src} "
                f"(expected {rec.num_frames} frame files, got {n})"
            )


class ExpressionClipDataset(Dataset):
    """Expression clips of ``T`` frames sampled by segments, with clip-level labels.

    Item: ``dict(clip=FloatTensor[T, 3, H, W], label=LongTensor[] (scalar), index=int)``. Without a
    transform the clip is float in ``[0, 1]``.

    Args:
        records: :class:`ExpressionRecord` list (e.g. from :func:`read_manifest`).
        root: Dataset root; ``root / record.path`` is a folder of frame images (names sorting in
            time order, numbers compared numerically) or a video file (decoded with PyAV).
        num_frames: ``T``, frames per clip.
        train: Random segment offsets (True) or segment centres (False); see :func:`segment_indices`.
        transform: Applied to the ``[T, 3, H, W]`` clip. A :class:`ClipTransform` receives the item's
            generator; any other callable is called as ``transform(clip)``.
        seed: ``None`` draws from torch's global RNG (DataLoader workers seed it per worker). An int
            makes every item reproducible: item ``i`` in epoch ``e`` uses a generator seeded from
            ``(seed, e, i)``; call :meth:`set_epoch` to change the draws per epoch.
        frame_count: What ``n`` is when the folder disagrees with the manifest's ``num_frames``:
            ``"disk"`` (default) samples over the files present and warns; ``"manifest"`` samples
            over the manifest count, reading the last file for indices past the end (the released
            SSM loader's behaviour), and warns; ``"error"`` raises :class:`FrameCountMismatchError`.
        extensions: File endings counted as frames.
        fast_decode: Decode through the fast path (uint8 geometry, one float conversion at output
            size, sampled video frames only); ``False`` runs the float reference path. Same random
            draws; see the module docstring for the tolerances.
        draft: With ``fast_decode``, allow reduced-scale decoding of JPEGs much larger than the crop.
        sampler: Picks the ``T`` frame indices of a clip of ``n`` frames, called as
            ``sampler(n, T, train, generator)`` (:data:`FrameSampler`): :func:`segment_indices`
            (default) or :func:`release_segment_indices` (the released SSM code's sampler). It
            must return ``T`` ints in ``[0, n-1]`` (checked on every item).
    """

    def __init__(
        self,
        records: Sequence[ExpressionRecord],
        root: PathLike,
        *,
        num_frames: int = 16,
        train: bool = False,
        transform: Callable[..., Tensor] | None = None,
        seed: int | None = None,
        frame_count: Literal["disk", "manifest", "error"] = "disk",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        fast_decode: bool = True,
        draft: bool = True,
        sampler: FrameSampler = segment_indices,
    ) -> None:
        _check_num_frames(num_frames)
        if not callable(sampler):
            raise TypeError(f"sampler must be callable as sampler(n, T, train, generator) (expected a callable, got {type(sampler).__name__})")
        if frame_count not in ("disk", "manifest", "error"):
            raise ValueError(f"frame_count must be 'disk', 'manifest' or 'error' (expected one of them, got {frame_count!r})")
        records = list(records)
        if not records:
            raise ValueError("ExpressionClipDataset needs at least one record (expected a non-empty list of ExpressionRecord, got none)")
        for i, r in enumerate(records):
            if not isinstance(r, ExpressionRecord):
                raise TypeError(f"records[{i}] must be an ExpressionRecord (expected ExpressionRecord, got {type(r).__name__})")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset root not found: {os.fspath(root)} (expected an existing folder, got "
                                    f"{'a file' if os.path.exists(root) else 'no such path'})")
        self.records = records
        self.root = Path(root)
        self.num_frames = num_frames
        self.train = train
        self.transform = transform
        self.seed = seed
        self.frame_count = frame_count
        self.extensions = tuple(extensions)
        self.fast_decode = bool(fast_decode)
        self.draft = bool(draft)
        self.sampler = sampler
        self.epoch = 0
        self._files: dict[int, list[str]] = {}
        self._video_counts: dict[int, int] = {}

    @classmethod
    def from_manifest(cls, manifest: PathLike, format: str, root: PathLike, **kwargs: Any) -> ExpressionClipDataset:
        """Build from a manifest file (:func:`read_manifest`) of an expression format."""
        if get_format(format).kind != "expression":
            raise ValueError(f"format {format!r} is not an expression format; use AUClipDataset")
        return cls(read_manifest(manifest, format), root, **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item generators (only matters when ``seed`` is set)."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> list[int]:
        """Labels of all records, in order (for class weights / samplers)."""
        return [r.label for r in self.records]

    def frame_files(self, index: int) -> list[str]:
        """Natural-sorted frame file names of record ``index`` (cached)."""
        if index not in self._files:
            self._files[index] = list_frame_files(self.root / self.records[index].path, self.extensions)
        return self._files[index]

    def _resolve_count(self, rec: ExpressionRecord, on_disk: int, src: Path) -> int:
        if on_disk == 0:
            raise FileNotFoundError(f"no frames ({'/'.join(self.extensions)}) in {src} (expected {rec.num_frames} frame files, got 0)")
        if on_disk == rec.num_frames:
            return on_disk
        msg = f"{src}: manifest says {rec.num_frames} frames, found {on_disk} (expected {rec.num_frames} frame files, got {on_disk})"
        if self.frame_count == "error":
            raise FrameCountMismatchError(msg)
        warnings.warn(f"{msg}; sampling over the {self.frame_count} count", stacklevel=3)
        return on_disk if self.frame_count == "disk" else rec.num_frames

    def sample_indices(self, index: int, generator: torch.Generator | None = None) -> list[int]:
        """Frame indices (into the sorted frame list) that item ``index`` reads."""
        rec = self.records[index]
        src = self.root / rec.path
        if self._is_video(src):
            n = self._video_count(index, src)
        else:
            n = self._resolve_count(rec, len(self.frame_files(index)), src)
        return self._indices(n, generator)

    def _indices(self, n: int, generator: torch.Generator | None) -> list[int]:
        """The sampler's ``T`` indices over ``n`` frames, checked."""
        idx = self.sampler(n, self.num_frames, self.train, generator)
        if len(idx) != self.num_frames or not all(isinstance(i, int) and 0 <= i < n for i in idx):
            raise ValueError(f"sampler {getattr(self.sampler, '__name__', self.sampler)!r} returned {list(idx)!r} "
                             f"(expected {self.num_frames} ints in [0, {n - 1}])")
        return list(idx)

    def _video_count(self, index: int, src: Path) -> int:
        if not self.fast_decode:
            return len(read_video_frames(src))
        if index not in self._video_counts:
            self._video_counts[index] = video_frame_count(src)
        return self._video_counts[index]

    def _is_video(self, src: Path) -> bool:
        return src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS

    def _video(self, src: Path) -> list[Tensor]:
        return read_video_frames(src)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips (expected {-len(self)} <= index < {len(self)}, got {index})")
        index = index % len(self)
        rec = self.records[index]
        g = _item_generator(self.seed, self.epoch, index)
        src = self.root / rec.path
        if self.fast_decode:
            if self._is_video(src):
                idx = self._indices(self._video_count(index, src), g)
                frames: list[Any] = decode_video_frames(src, idx)
            else:
                files = self.frame_files(index)
                n = self._resolve_count(rec, len(files), src)
                idx = self._indices(n, g)
                frames = [src / files[min(i, len(files) - 1)] for i in idx]
            clip = _fast_clip(self.transform, frames, g, f"frames of {src}", self.draft)
        elif self._is_video(src):
            video = self._video(src)
            idx = self._indices(len(video), g)
            clip = _apply_transform(self.transform, _stack([video[i] for i in idx], str(src)), g)
        else:
            files = self.frame_files(index)
            n = self._resolve_count(rec, len(files), src)
            idx = self._indices(n, g)
            cache: dict[int, Tensor] = {}
            chosen = []
            for i in idx:
                j = min(i, len(files) - 1)
                if j not in cache:
                    cache[j] = load_frame(src / files[j])
                chosen.append(cache[j])
            clip = _apply_transform(self.transform, _stack(chosen, str(src)), g)
        return {"clip": clip, "label": torch.tensor(rec.label, dtype=torch.long), "index": index}

    def __repr__(self) -> str:
        return (
            f"ExpressionClipDataset(clips={len(self)}, root={str(self.root)!r}, num_frames={self.num_frames}, "
            f"train={self.train}, frame_count={self.frame_count!r}, fast_decode={self.fast_decode}, "
            f"sampler={getattr(self.sampler, '__name__', type(self.sampler).__name__)})"
        )


# ----------------------------------------------------------------------------------------------
# AU windows


def split_runs(frame_indices: Sequence[int]) -> list[list[int]]:
    """Split sorted, unique frame numbers into continuous runs (``[0,1,2,5,6] -> [[0,1,2],[5,6]]``).

    Raises:
        ValueError: if the numbers are not strictly increasing.
    """
    runs: list[list[int]] = []
    prev = None
    for f in frame_indices:
        if prev is not None and f <= prev:
            raise ValueError(f"frame numbers must be strictly increasing (expected a number > {prev}, got {prev} then {f})")
        if prev is None or f != prev + 1:
            runs.append([])
        runs[-1].append(int(f))
        prev = f
    return runs


def _plan_run(
    run_length: int, num_frames: int, label_mode: str, stride: int, eval_cover: bool
) -> list[tuple[int, int]]:
    """``(anchor, max_jitter)`` per window of one run; slot ``j`` reads run position ``anchor + j``."""
    L, T, c = run_length, num_frames, num_frames // 2
    out: list[tuple[int, int]] = []
    if eval_cover:
        return [(p - c, 0) for p in range(L)]
    if label_mode == "center":
        for p in range(min(c, L - 1), L, stride):
            out.append((p - c, min(stride - 1, L - 1 - p)))
        return out
    a = 0
    while True:
        out.append((a, min(stride - 1, max(L - T - a, 0))))
        a += stride
        if a - stride + T >= L or a >= L:
            return out


#: ``planner(run_length, num_frames, stride) -> [(anchor, max_shift), ...]``: the windows of one run
#: when an :class:`AUClipDataset` is given a ``planner`` (e.g. :func:`full_windows`). Slot ``j`` of
#: a window reads run position ``anchor + j``; training shifts the anchor by ``0 .. max_shift``.
WindowPlanner = Callable[[int, int, int], "list[tuple[int, int]]"]


def full_windows(run_length: int, num_frames: int, stride: int) -> list[tuple[int, int]]:
    """Windows of ``T`` real frames only: starts ``0, stride, 2*stride, ... <= L - T``, no shift.

    The released SSM code's AU *training* clips (``ssm/data/bp4d.py`` and ``ssm/data/disfa.py``
    with ``complete_evaluation=False``; stride 16 = ``T`` there): runs shorter than ``T`` give no
    window and the tail of a run that does not fill a window is never read, so every slot is a
    real frame (``mask`` all True) and no window is shifted. A :data:`WindowPlanner` for
    :class:`AUClipDataset` (``planner=full_windows``); the release evaluates every frame with
    other windows (here: ``eval_cover`` or the default planning with ``stride = T``).

    Args:
        run_length: ``L >= 1`` frames in the run.
        num_frames: ``T >= 1``.
        stride: Step between window starts (``>= 1``).

    Returns:
        ``[(anchor, 0), ...]`` (empty when ``L < T``).

    Examples::

        >>> full_windows(40, 16, 16)
        [(0, 0), (16, 0)]
        >>> full_windows(15, 16, 16)
        []
    """
    if isinstance(run_length, bool) or not isinstance(run_length, int) or run_length < 1:
        raise ValueError(f"run_length must be a positive int (expected an integer >= 1, got {run_length!r})")
    _check_num_frames(num_frames)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (expected an integer >= 1, got {stride!r})")
    return [(a, 0) for a in range(0, run_length - num_frames + 1, stride)]


def _plan(
    run_length: int, num_frames: int, label_mode: str, stride: int, eval_cover: bool, planner: WindowPlanner | None
) -> list[tuple[int, int]]:
    """The windows of one run: the ``planner``'s when given, else the built-in rule (:func:`_plan_run`)."""
    if planner is None:
        return _plan_run(run_length, num_frames, label_mode, stride, eval_cover)
    plan = [(int(a), int(j)) for a, j in planner(run_length, num_frames, stride)]
    bad = [(a, j) for a, j in plan if j < 0]
    if bad:
        raise ValueError(f"planner {getattr(planner, '__name__', planner)!r} returned negative shifts {bad[:3]} "
                         f"(expected (anchor, max_shift >= 0) pairs)")
    return plan


@dataclass(frozen=True)
class AUWindow:
    """One planned window: the frames its ``T`` slots read and which of them are real.

    Attributes:
        frames: Frame number read by each slot (padding slots repeat the run's edge frame).
        mask: True where the slot is a real frame of the window, False for padding.
        centre: Frame number at slot ``T // 2``.
    """

    frames: tuple[int, ...]
    mask: tuple[bool, ...]
    centre: int


def _realise(run: Sequence[int], anchor: int, num_frames: int) -> tuple[list[int], list[bool]]:
    L = len(run)
    positions = [anchor + j for j in range(num_frames)]
    return [min(max(p, 0), L - 1) for p in positions], [0 <= p < L for p in positions]


def au_windows(
    frame_indices: Sequence[int],
    num_frames: int,
    *,
    label_mode: Literal["center", "all"] = "center",
    stride: int | None = None,
    eval_cover: bool = False,
    planner: WindowPlanner | None = None,
) -> list[AUWindow]:
    """Plan the (evaluation-mode, unshifted) windows of one sequence; the rule :class:`AUClipDataset` uses.

    Args:
        frame_indices: Labelled frame numbers of one sequence (any order, no duplicates).
        num_frames: ``T``.
        label_mode, stride, eval_cover, planner: As in :class:`AUClipDataset`.
    """
    _check_num_frames(num_frames)
    stride = num_frames if stride is None else stride
    _check_au_args(label_mode, stride)
    _check_planner(planner, eval_cover)
    out = []
    for run in split_runs(sorted(frame_indices)):
        for anchor, _ in _plan(len(run), num_frames, label_mode, stride, eval_cover, planner):
            pos, mask = _realise(run, anchor, num_frames)
            frames = tuple(run[p] for p in pos)
            out.append(AUWindow(frames, tuple(mask), frames[num_frames // 2]))
    return out


def _check_planner(planner: WindowPlanner | None, eval_cover: bool) -> None:
    if planner is not None and not callable(planner):
        raise TypeError(f"planner must be callable as planner(run_length, num_frames, stride) (expected a callable, got {type(planner).__name__})")
    if planner is not None and eval_cover:
        raise ValueError("planner and eval_cover both choose the windows (expected one of them, got both)")


def _check_au_args(label_mode: str, stride: int) -> None:
    if label_mode not in ("center", "all"):
        raise ValueError(f"label_mode must be 'center' or 'all' (expected one of them, got {label_mode!r})")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (expected an integer >= 1, got {stride!r})")


class AUClipDataset(Dataset):
    """``T``-frame windows over frame-labelled AU sequences (BP4D, DISFA).

    Item: ``dict(clip=FloatTensor[T, 3, H, W], labels=FloatTensor[M] ("center") or [T, M] ("all"),
    mask=BoolTensor[T], index=int)``; ``M`` is the label length of the records.

    Windows. Records are grouped by ``sequence`` (sequences in order of first appearance, windows
    in time order within each), sorted by ``frame_index`` and split into *runs* of
    consecutive frame numbers (a missing number ends a run), so a window never spans a gap. Slot
    ``j`` of a window with anchor ``a`` reads run position ``a + j``; positions outside the run
    are edge-padded (they repeat the first/last frame of the run) and have ``mask`` False. With
    ``c = T // 2`` (the centre slot, as in :class:`~facelayers.temporal.FrameTemporalHead`) and
    ``L`` the run length:

    * ``label_mode="center"``: windows are centred on run positions
      ``p = min(c, L-1), min(c, L-1) + stride, ... < L`` (anchor ``p - c``), so the centre slot is
      always a real labelled frame and ``labels`` are that frame's AUs. Runs shorter than ``T``
      are padded on one or both sides.
    * ``label_mode="all"``: windows start at ``a = 0, stride, 2*stride, ... < L`` and stop after
      the first window that reaches the run end; the last one may be right-padded. ``labels[t]`` are the
      AUs of the frame in slot ``t`` (padding slots repeat the edge frame's labels, mask False).
      With ``stride = T`` every labelled frame is a real (mask True) slot exactly once.
    * ``eval_cover=True`` (either mode): one window centred on every labelled frame (anchor
      ``p - c`` for every ``p``), so each frame is the centre slot exactly once.
    * ``train=True`` shifts each window by a uniform ``0 .. stride-1`` (one draw per item), never
      past the run end, so every frame can be seen in every slot across epochs.
    * ``planner`` (a :data:`WindowPlanner`) replaces the rules above, e.g. :func:`full_windows`:
      the released SSM code's training windows (only whole ``T``-frame windows, runs shorter
      than ``T`` and run tails dropped, no shift), in either label mode.

    Args:
        records: :class:`AURecord` list (e.g. from :func:`read_manifest`).
        root: Dataset root; frames are ``root / record.path``.
        num_frames: ``T``.
        label_mode: ``"center"`` or ``"all"``.
        train: Random window shifts (see above); eval windows are fixed.
        stride: Window step (default ``T``).
        transform: Applied to the clip (a :class:`ClipTransform` gets the item's generator).
        eval_cover: One window per labelled frame (as centre).
        seed: As in :class:`ExpressionClipDataset`.
        fast_decode, draft: As in :class:`ExpressionClipDataset`.
        planner: Plans the windows of each run (``planner(run_length, T, stride)`` ->
            ``[(anchor, max_shift), ...]``) instead of the built-in rules; not with ``eval_cover``.

    Raises:
        ValueError: duplicate ``(sequence, frame_index)``, labels of different lengths, bad args,
            a ``planner`` that leaves no window.
    """

    def __init__(
        self,
        records: Sequence[AURecord],
        root: PathLike,
        *,
        num_frames: int = 16,
        label_mode: Literal["center", "all"] = "center",
        train: bool = False,
        stride: int | None = None,
        transform: Callable[..., Tensor] | None = None,
        eval_cover: bool = False,
        seed: int | None = None,
        fast_decode: bool = True,
        draft: bool = True,
        planner: WindowPlanner | None = None,
    ) -> None:
        _check_num_frames(num_frames)
        stride = num_frames if stride is None else stride
        _check_au_args(label_mode, stride)
        _check_planner(planner, eval_cover)
        records = list(records)
        if not records:
            raise ValueError("AUClipDataset needs at least one record (expected a non-empty list of AURecord, got none)")
        m = None
        groups: dict[str, list[AURecord]] = {}
        for i, r in enumerate(records):
            if not isinstance(r, AURecord):
                raise TypeError(f"records[{i}] must be an AURecord (expected AURecord, got {type(r).__name__})")
            if m is None:
                m = len(r.labels)
            elif len(r.labels) != m:
                raise ValueError(f"records[{i}] has {len(r.labels)} labels, records[0] has {m}")
            groups.setdefault(r.sequence, []).append(r)
        self.records = records
        self.root = Path(root)
        self.num_frames = num_frames
        self.label_mode = label_mode
        self.train = train
        self.stride = stride
        self.transform = transform
        self.eval_cover = eval_cover
        self.seed = seed
        self.fast_decode = bool(fast_decode)
        self.draft = bool(draft)
        self.planner = planner
        self.epoch = 0
        self.num_labels = int(m or 0)
        # runs: lists of records with consecutive frame numbers; windows: (run id, anchor, jitter)
        self.runs: list[list[AURecord]] = []
        self._windows: list[tuple[int, int, int]] = []
        for seq, recs in groups.items():
            recs.sort(key=lambda r: r.frame_index)
            for a, b in zip(recs, recs[1:]):
                if a.frame_index == b.frame_index:
                    raise ValueError(f"sequence {seq!r} lists frame {a.frame_index} twice ({a.path!r}, {b.path!r})")
            by_index = {r.frame_index: r for r in recs}
            for run in split_runs([r.frame_index for r in recs]):
                rid = len(self.runs)
                self.runs.append([by_index[f] for f in run])
                for anchor, jitter in _plan(len(run), num_frames, label_mode, stride, eval_cover, planner):
                    self._windows.append((rid, anchor, 0 if eval_cover else jitter))
        if not self._windows:
            longest = max(len(r) for r in self.runs)
            raise ValueError(f"planner {getattr(planner, '__name__', planner)!r} planned no window over {len(self.runs)} "
                             f"runs (expected at least one run long enough, got runs of at most {longest} frames "
                             f"for T={num_frames})")

    @classmethod
    def from_manifest(cls, manifest: PathLike, format: str, root: PathLike, **kwargs: Any) -> AUClipDataset:
        """Build from a manifest file (:func:`read_manifest`) of an AU format."""
        if get_format(format).kind != "au":
            raise ValueError(f"format {format!r} is not an AU format; use ExpressionClipDataset")
        return cls(read_manifest(manifest, format), root, **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._windows)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used to seed per-item generators (only matters when ``seed`` is set)."""
        self.epoch = int(epoch)

    def window_frames(self, index: int, generator: torch.Generator | None = None) -> tuple[list[AURecord], list[bool]]:
        """Records read by the ``T`` slots of window ``index`` and the mask (True = real frame).

        In training mode the shift is drawn from ``generator`` (the same draw ``__getitem__``
        makes first with the item's generator).
        """
        rid, anchor, jitter = self._windows[index]
        if self.train and jitter > 0:
            anchor += int(torch.randint(0, jitter + 1, (), generator=generator))
        run = self.runs[rid]
        pos, mask = _realise(run, anchor, self.num_frames)
        return [run[p] for p in pos], mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        index = index % len(self)
        g = _item_generator(self.seed, self.epoch, index)
        recs, mask = self.window_frames(index, g)
        where = f"sequence {recs[0].sequence!r}"
        if self.fast_decode:
            clip = _fast_clip(self.transform, [self.root / r.path for r in recs], g, f"frames of {where}", self.draft)
        else:
            cache: dict[str, Tensor] = {}
            frames = []
            for r in recs:
                if r.path not in cache:
                    cache[r.path] = load_frame(self.root / r.path)
                frames.append(cache[r.path])
            clip = _apply_transform(self.transform, _stack(frames, where), g)
        if self.label_mode == "center":
            labels = torch.tensor(recs[self.num_frames // 2].labels, dtype=torch.float32)
        else:
            labels = torch.tensor([r.labels for r in recs], dtype=torch.float32)
        return {"clip": clip, "labels": labels, "mask": torch.tensor(mask, dtype=torch.bool), "index": index}

    def __repr__(self) -> str:
        return (
            f"AUClipDataset(windows={len(self)}, frames={len(self.records)}, runs={len(self.runs)}, "
            f"num_frames={self.num_frames}, label_mode={self.label_mode!r}, stride={self.stride}, "
            f"train={self.train}, eval_cover={self.eval_cover}, fast_decode={self.fast_decode}"
            + (f", planner={getattr(self.planner, '__name__', type(self.planner).__name__)})" if self.planner else ")")
        )
